"""Serving: a continuous-batching engine (``engine``), the OpenAI-compatible HTTP server (``app``), the media
gate every image URL goes through (``media``), the load generator (``bench``) and a web chat page."""
