"""Errors that describe the user's input rather than a bug (the CLI prints them as one line, exit code 2)."""


class UserError(ValueError):
    """A mistake in what the user gave (flag, path, file); the message names it and the fix."""
