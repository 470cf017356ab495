"""Writing an NVLM model in nvlm's format (read back by ``nvlm.models.pretrained.from_pretrained``):

    out/
      config.json              NVLMConfig (architecture, tiling, tags, projector, x-attn; backbone configs)
      model.safetensors        NVLM's own modules: projector.*, resampler.* (if any), xattn.* (x-attn blocks)
      preprocessor_config.json tile size, tiling limits, normalisation (for other tools; config.json rules)
      tokenizer.json, …        the tokenizer, with NVLM's tokens added
      llm/                     the backbone LLM as an ordinary Hugging Face checkpoint (its own parameter names)
      vision/                  the vision encoder as an ordinary Hugging Face checkpoint
      llm_adapter/             only for a LoRA model: its adapters in PEFT's format (``nvlm.models.lora``); llm/
                               then holds the base weights the adapters apply to

Every file is JSON or safetensors: no pickle, no remote code. This module does not import the model class, so
``NVLM.save_pretrained`` can call it without an import cycle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nvlm.models.llm import config_dict, decoder_layers
from nvlm.models.lora import base_names, has_adapters, save_adapters

OWN_PREFIXES = ("projector.", "resampler.", "xattn.")  # NVLM's own modules, in model.safetensors


def save_pretrained(model: Any, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` in nvlm's format. `state_dict`: the full weights to write instead of the module's own
    (a sharded model's, gathered onto one process by ``nvlm.distributed.dcp.export_pretrained``)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.config.llm.hf_config = config_dict(model.llm)
    model.config.save(out / "config.json")
    state = model.state_dict() if state_dict is None else state_dict
    if has_adapters(model):  # PEFT-format adapters aside; the backbones get their base weights, plain names
        save_adapters(model, out, state)
        state = base_names(state)
    state = backbone_names(model, state)
    own = {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(OWN_PREFIXES)}
    save_file(own, str(out / "model.safetensors"), metadata={"format": "pt", "nvlm_arch": model.config.arch})
    model.tokenizer.save_pretrained(out)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    model.llm.save_pretrained(out / "llm", state_dict=part("llm."))
    model.vision.model.save_pretrained(out / "vision", state_dict=part("vision.model."))
    p = model.processor
    pre = {
        "tile_size": p.tile_size,
        "tokens_per_tile": p.tokens_per_tile,
        "image_mean": list(p.mean),
        "image_std": list(p.std),
        "min_tiles": model.config.tiling.min_tiles,
        "max_tiles": model.config.tiling.max_tiles,
        "use_thumbnail": model.config.tiling.use_thumbnail,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def backbone_names(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the names our format saves: NVLM-X/H hold each scheduled LLM layer inside a
    ``CrossAttentionDecoderLayer`` (``llm.model.layers.3.layer.mlp.…``); on disk the backbone keeps its own names
    (``llm.model.layers.3.mlp.…``), so ``llm/`` is an ordinary Hugging Face checkpoint, as before X/H wrapped it."""
    if not model.xattn_layers:
        return state
    layers = decoder_layers(model.llm)
    prefix = next(name for name, m in model.named_modules() if m is layers)  # e.g. "llm.model.layers"
    renames = {f"{prefix}.{i}.layer.": f"{prefix}.{i}." for i in model.xattn_layers}
    out = {}
    for k, v in state.items():
        old = next((o for o in renames if k.startswith(o)), None)
        out[k if old is None else renames[old] + k[len(old) :]] = v
    return out
