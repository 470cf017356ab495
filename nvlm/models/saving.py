"""Writing an NVLM model in nvlm's format (read back by ``nvlm.load``), with its processor's files beside it:

    out/
      config.json              NVLMConfig (architecture, tiling, tags, projector, x-attn; backbone configs)
      model.safetensors        NVLM's own modules: projector.*, resampler.* (if any), xattn.* (x-attn blocks)
      preprocessor_config.json tile size, tiling limits, normalisation (``processor.save_pretrained``)
      tokenizer.json, …        the processor's tokenizer, with NVLM's tokens added (the same)
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nvlm.models.llm import config_dict
from nvlm.models.lora import base_names, has_adapters, save_adapters
from nvlm.models.names import backbone_names

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
    state = backbone_names(model, state)  # X/H: the x-attn-wrapped LLM layers under the backbone's own names
    own = {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(OWN_PREFIXES)}
    save_file(own, str(out / "model.safetensors"), metadata={"format": "pt", "nvlm_arch": model.config.arch})

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    for folder, module, prefix in (("llm", model.llm, "llm."), ("vision", model.vision.model, "vision.model.")):
        weights = part(prefix)
        # a copy: transformers may empty the dict it is given as it writes (it did for a model not made by its
        # own from_pretrained), and the weights' dtype is read from it afterwards
        with no_shard_bars():
            module.save_pretrained(out / folder, state_dict=dict(weights))
        stamp_dtype(out / folder / "config.json", weights)


@contextmanager
def no_shard_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar per save_pretrained: a training run saves every few
    hundred steps, and its console is ours (our progress bar, our log lines), so that bar is off while we save."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def stamp_dtype(config_json: Path, weights: dict[str, torch.Tensor]) -> None:
    """Make a backbone's config.json name the dtype its weights were written in. transformers writes the
    module's config, i.e. the fp32 master copy's dtype, also when bf16 weights are written (a bf16 export of
    a sharded run), and ``dtype="auto"`` would then load a 72B model in fp32."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in weights.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    if not sizes:
        return
    name = str(max(sizes, key=lambda d: sizes[d])).removeprefix("torch.")  # most weights' dtype, e.g. "bfloat16"
    cfg = json.loads(config_json.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
