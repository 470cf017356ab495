"""The quantization schemes and the default keep-list, and their command-line flags, without importing torch
(``nvlm --help`` stays fast); the quantizing itself is ``nvlm.inference.quantize``."""

from __future__ import annotations

from typing import Any

SCHEMES = ("int8", "int4", "fp8")
DEFAULT_KEEP = ("vision.", "projector.", "resampler.", "llm.lm_head")
INT4_GROUP = 128  # weights per int4 scale and zero point


def parse_keep(text: str | None) -> tuple[str, ...]:
    """``--quantize-keep`` "vision.,projector.,llm.lm_head": module-name prefixes kept unquantized."""
    if text is None:
        return DEFAULT_KEEP
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_arguments(p: Any) -> None:
    """``--quantize`` and ``--quantize-keep`` on a command that loads a model (serve, chat, eval run)."""
    p.add_argument(
        "--quantize",
        default=None,
        choices=list(SCHEMES),
        help="weight-only quantization of the LLM's Linears as they load (torchao): int8 (CPU, CUDA), "
        "int4 (CUDA packed; CPU stored one per byte), fp8 (CUDA sm89+)",
    )
    p.add_argument(
        "--quantize-keep",
        default=None,
        metavar="PREFIXES",
        help=f"comma-separated module-name prefixes left unquantized (default: {','.join(DEFAULT_KEEP)})",
    )
