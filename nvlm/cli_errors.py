"""The CLI's one error path: which exceptions are the user's mistake, and how each becomes one line.

``nvlm.cli.main`` runs every sub-command and asks ``is_user_error`` about what it raises: a user error is printed
as one line (``one_line``) and the exit status is 2. Anything else is a bug and keeps its traceback;
``nvlm --debug`` shows the traceback of user errors too. Before a command runs, ``check_input_files`` refuses
device files and FIFOs given as inputs (``/dev/zero`` would be read forever; a FIFO blocks).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

import yaml

from nvlm.config import ConfigError
from nvlm.errors import UserError
from nvlm.vision.image_io import ImageLoadError

# Exceptions that only ever describe the user's input: config keys and values, data records, images, text
# with control tokens, paths that do not exist or cannot be read, YAML/JSON that does not parse or nests
# too deeply. (A ValueError in general is not here: it may be a bug.)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ImageLoadError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
    UnicodeDecodeError, RecursionError, yaml.YAMLError, UserError,
)  # fmt: skip
# The same, from modules that import torch: looked up only once their module is loaded (an exception of a
# class cannot exist before its module does), so a mistake found early is reported without loading torch.
LATE_USER_ERRORS = (("nvlm.data.formats", "DataFormatError"), ("nvlm.data.processor", "ControlTokenError"))

FILE_ARGS = ("file", "images", "image", "recipe", "model", "tokenizer", "folder")


def _inputs(args: argparse.Namespace) -> list[str]:
    out = []
    for name in FILE_ARGS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                out.append(v)
    return out


def is_user_error(error: BaseException) -> bool:
    """Whether `error` describes the user's input (one line, exit 2) rather than a bug (a traceback)."""
    late = tuple(getattr(sys.modules[m], name) for m, name in LATE_USER_ERRORS if m in sys.modules)
    return isinstance(error, USER_ERRORS + late)


def check_input_files(args: argparse.Namespace) -> None:
    """UserError for an input path that is a device or FIFO (reading it never ends, or blocks)."""
    for path in _inputs(args):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # missing paths are reported by the command itself, with its own wording
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UserError(f"{path}: not a regular file (a device or FIFO); give a file")


def one_line(error: BaseException, args: argparse.Namespace) -> str:
    """The error as one line that names the input and the fix."""
    if isinstance(error, RecursionError):
        where = ", ".join(_inputs(args)) or "the input"
        return f"{where}: nested too deeply to read (JSON/YAML depth); flatten the structure"
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}; check the path"
    if isinstance(error, yaml.YAMLError):
        return f"{', '.join(_inputs(args)) or 'YAML'}: not valid YAML ({' '.join(str(error).split())[:200]})"
    text = " ".join(str(error).split())
    return text if len(text) <= 600 else text[:597] + "..."
