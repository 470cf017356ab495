"""Saved names of NVLM's parameters: the backbone LLM's own names, with the x-attn wrappers unwrapped.

NVLM-X and -H put a gated cross-attention block before some LLM layers (paper §4.3–4.4). In memory each such
layer sits inside a ``CrossAttentionDecoderLayer`` (attribute ``layer``), so its parameters are named
``llm.model.layers.3.layer.mlp.…``. What we write keeps the backbone's own names (``llm.model.layers.3.mlp.…``):
``llm/`` stays an ordinary Hugging Face checkpoint and a LoRA adapter's keys are those of the plain HF LLM.
This module is the one place that maps between the two; ``nvlm.interop.keymap`` starts from the saved names.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from nvlm.models.llm import decoder_layers

WRAPPED = "layer"  # CrossAttentionDecoderLayer's attribute that holds the HF decoder layer
V = TypeVar("V")


def xattn_renames(model: Any, root: nn.Module | None = None) -> dict[str, str]:
    """{wrapped prefix: saved prefix} for every LLM layer an x-attn block wraps ({} for NVLM-D), with names
    relative to `root` (default the whole model: ``"llm.model.layers.3.layer."`` → ``"llm.model.layers.3."``;
    ``model.llm`` for names inside the LLM: ``"model.layers.3.layer."`` → ``"model.layers.3."``)."""
    if not model.xattn_layers:
        return {}
    layers = decoder_layers(model.llm)
    prefix = next(name for name, m in (model if root is None else root).named_modules() if m is layers)
    return {f"{prefix}.{i}.{WRAPPED}.": f"{prefix}.{i}." for i in model.xattn_layers}


def backbone_names(
    model: Any, state: dict[str, V], root: nn.Module | None = None, reverse: bool = False
) -> dict[str, V]:
    """`state` with every in-memory name under its saved name (`reverse`: every saved name under its in-memory
    name). `root`: what the names are relative to, as in ``xattn_renames``. Other names pass unchanged."""
    renames = xattn_renames(model, root)
    if reverse:
        renames = {saved: wrapped for wrapped, saved in renames.items()}
    out = {}
    for k, v in state.items():
        old = next((o for o in renames if k.startswith(o)), None)
        out[k if old is None else renames[old] + k[len(old) :]] = v
    return out
