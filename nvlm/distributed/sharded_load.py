"""Sharded start-up (issue 17): every process reads only its own rows of the backbones' safetensors.

A sharded run builds its model on the meta device and shards it (FSDP2, possibly tensor parallel too); each
parameter is then a DTensor whose placements say which block of the full tensor this process holds. This module
fills those blocks straight from the files (``safe_open`` memory-maps them; ``get_slice`` reads only the block),
so no process ever holds the full model and nothing is broadcast.

What is not in any file is drawn the way the one-process build draws it (``nvlm.models.pretrained.compose``):
every process builds a *skeleton* of the run's model with the same seed: the backbones' parameters on the meta
device (their buffers, e.g. RoPE's ``inv_freq``, real), NVLM's own modules (projector, x-attn blocks) and a
random vision tower real, and the seed of the added embedding rows (``nvlm.models.llm.new_embedding_rows``).
These parts are small next to the LLM; each process copies its block of them.

Handled: backbone folders (LLM: any Hugging Face safetensors folder; vision: a vision-only or InternVL-hf
folder, or a config dict) and ``model.init_from`` nvlm checkpoints (``nvlm.models.saving`` layout). Anything
else (an LLM from a config, LoRA, the released NVLM-D layout, an original InternViT folder) returns no plan and
the caller falls back to loading on process 0 and broadcasting.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nvlm.models.llm import embedding_weights, new_embedding_rows
from nvlm.models.saving import backbone_names

# wrappers that torch inserts into parameter names (activation checkpointing, compile, FSDP1)
_WRAPPERS = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


@dataclass(frozen=True)
class FileTensor:
    """A tensor in a safetensors file; `new_rows` (seed, which, std, rows in the model): rows past the file's
    are added tokens (``nvlm.models.llm.new_embedding_rows``)."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    new_rows: tuple[int, int, float, int] | None = None


@dataclass
class Plan:
    """Where every parameter and buffer of the run's model comes from (by name, wrappers stripped)."""

    sources: dict[str, FileTensor | torch.Tensor]
    bytes_read: dict[str, int] = field(default_factory=dict)  # file → bytes this process read from it


def clean_name(name: str) -> str:
    return _WRAPPERS.sub(r"\1", name)


def tensor_index(folder: Path) -> dict[str, Path]:
    """{tensor key: file} of a Hugging Face safetensors folder (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _header(path: Path, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    with safe_open(str(path), "pt") as f:
        sl = f.get_slice(key)
        return tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), torch.float32)


Folders = dict[str, tuple[Path, tuple[str, ...]]]


def skeleton(cfg: Any) -> tuple[Any, Folders, int | None] | None:
    """The run's model with meta backbones (see the module doc), the folders its meta weights come from
    ({name prefix: (folder, key prefixes to try)}), and the added embedding rows' seed; None if not handled."""
    from accelerate import init_empty_weights  # type: ignore[import-untyped]

    from nvlm.config import NVLMConfig
    from nvlm.models.llm import load_llm, load_llm_config, load_tokenizer
    from nvlm.models.nvlm import NVLM
    from nvlm.models.pretrained import compose
    from nvlm.vision.encoder import _config_json, _original_internvit, load_vision_model, vision_config

    spec = cfg.model
    if cfg.train.lora.enabled:
        return None
    torch.manual_seed(cfg.train.seed)  # as nvlm.training.build._build: the same stream, the same draws
    if spec.init_from:
        root = Path(spec.init_from)
        if not (root / "llm").is_dir() or not (root / "vision").is_dir():
            return None  # e.g. the released NVLM-D layout: renamed on load
        ncfg = NVLMConfig.load(root / "config.json")
        with init_empty_weights(include_buffers=False):
            llm = load_llm(dict(ncfg.llm.hf_config))
            vision, _ = load_vision_model(vision_config(ncfg.vision.type, **ncfg.vision.hf_config))
            model = NVLM(ncfg, llm, vision, load_tokenizer(root))
        model.llm.tie_weights()  # re-registering meta parameters unties them; the real load ties them
        saved: Folders = {"llm.": (root / "llm", ("",)), "vision.model.": (root / "vision", ("",)), "": (root, ("",))}
        return model, saved, None
    if not isinstance(spec.llm, (str, os.PathLike)):
        return None
    llm_dir = Path(spec.llm)
    with init_empty_weights(include_buffers=False):
        llm = load_llm(load_llm_config(llm_dir))
    folders: Folders = {"llm.": (llm_dir, ("",))}
    if isinstance(spec.vision, dict):  # a random vision tower: drawn here, as the one-process build does
        conf = dict(spec.vision)
        vision, kind = load_vision_model(vision_config(conf.pop("type"), **conf))
    else:
        vision_dir = Path(spec.vision)
        if _original_internvit(_config_json(vision_dir)):
            return None  # renamed and sliced on load (nvlm.interop.internvit)
        from nvlm.vision.encoder import load_vision_config

        with init_empty_weights(include_buffers=False):
            vision, kind = load_vision_model(load_vision_config(vision_dir))
        folders["vision.model."] = (vision_dir, ("", "model.vision_tower.", "vision_tower."))
    tokenizer = load_tokenizer(spec.tokenizer or llm_dir)
    model, seed = compose(spec.arch, llm, vision, kind, tokenizer, dict(spec.overrides))
    model.llm.tie_weights()  # re-registering meta parameters unties them; the real load ties them
    return model, folders, seed


def plan(cfg: Any) -> Plan | None:
    """Every process computes the same plan (from the same files and seed); None: not handled here."""
    built = skeleton(cfg)
    if built is None:
        return None
    model, folders, seed = built
    std = getattr(model.llm.config.get_text_config(), "initializer_range", 0.02)
    by_id = {id(p): n for n, p in model.named_parameters()}
    grown = {by_id[id(w)]: which for which, w in enumerate(embedding_weights(model.llm))}
    indexes = {prefix: tensor_index(folder) for prefix, (folder, _) in folders.items()}
    sources: dict[str, FileTensor | torch.Tensor] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_meta:
            sources[name] = tensor.detach()
            continue
        saved = next(iter(backbone_names(model, {name: tensor})))  # x-attn layers keep the LLM's names on disk
        prefix = max((p for p in folders if saved.startswith(p)), key=len, default=None)
        if prefix is None:
            return None
        rest = saved[len(prefix) :]
        key = next((k for k in (kp + rest for kp in folders[prefix][1]) if k in indexes[prefix]), None)
        if key is None:
            return None
        path = indexes[prefix][key]
        shape, dtype = _header(path, key)
        want = tuple(tensor.shape)
        if shape == want:
            sources[name] = FileTensor(path, key, shape, dtype)
        elif name in grown and seed is not None and shape[1:] == want[1:] and shape[0] < want[0]:
            sources[name] = FileTensor(path, key, shape, dtype, (seed, grown[name], std, want[0]))
        else:
            return None
    return Plan(sources)


def _block(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this process's local tensor, its shape, its offset in the full tensor) for a DTensor or a plain tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(tensor, DTensor):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(shape), tuple(offset)
    return tensor, tuple(tensor.shape), (0,) * tensor.dim()


def _read(src: FileTensor, shape: tuple[int, ...], offset: tuple[int, ...], plan: Plan) -> torch.Tensor:
    """Rows/columns [offset, offset + shape) of `src`, reading only those from its file."""
    box = [slice(o, o + n) for o, n in zip(offset, shape, strict=True)]
    file_rows = src.shape[0] if src.shape else 0
    parts = []
    with safe_open(str(src.path), "pt") as f:
        if not box:  # a 0-d tensor
            parts.append(f.get_tensor(src.key))
        elif box[0].start < file_rows:
            parts.append(f.get_slice(src.key)[(slice(box[0].start, min(box[0].stop, file_rows)), *box[1:])])
    for part in parts:
        plan.bytes_read[str(src.path)] = plan.bytes_read.get(str(src.path), 0) + part.numel() * part.element_size()
    if src.new_rows is not None and box[0].stop > file_rows:  # the added tokens' rows
        seed, which, std, rows = src.new_rows
        # rounded to the file's dtype: the one-process build grows the embedding as loaded
        new = new_embedding_rows(seed, which, rows - file_rows, src.shape[1], std).to(src.dtype)
        start = max(box[0].start, file_rows) - file_rows
        parts.append(new[start : box[0].stop - file_rows][(slice(None), *box[1:])])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.no_grad()
def load(model: nn.Module, plan: Plan) -> Plan:
    """Fill every parameter and buffer of the sharded `model` (after ``to_empty``) with this process's block."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        src = plan.sources[clean_name(name)]
        local, shape, offset = _block(tensor)
        if local.numel() == 0:
            continue
        if isinstance(src, torch.Tensor):
            value = src[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        else:
            value = _read(src, shape, offset, plan)
        local.copy_(value)
    return plan
