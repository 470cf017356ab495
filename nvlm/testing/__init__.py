"""Kits for tests, the demo and the benchmarks: tiny backbones built from config objects (``tiny``) and
replicas of the released NVLM-D-72B and original InternViT folders (``replica``), written to disk in their real
layouts so they load through the same code a user's checkpoint takes. The library's own paths never import them.
"""
