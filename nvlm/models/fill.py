"""Filling a skeleton (``nvlm.models.build``) with its weights, straight from safetensors files.

A skeleton's backbone parameters are on the meta device; ``plan`` says where each comes from (a tensor key in a
Hugging Face folder, or, for its real parts, the skeleton's own tensor) and ``load`` fills the model after
``to_empty``. One process reads every tensor whole. In a sharded run each parameter is a DTensor whose placements
say which block of the full tensor this process holds, and ``load`` reads only that block (``safe_open``
memory-maps the file; ``get_slice`` reads the block), so no process ever holds the full model and nothing is
broadcast. The added embedding rows are drawn from the skeleton's seed (``nvlm.models.llm.new_embedding_rows``),
and a new model's x-attn blocks from theirs (``nvlm.models.xattn_init``), block by block, so every process gets
the values one process would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nvlm.models.llm import embedding_weights, new_embedding_rows
from nvlm.models.names import backbone_names
from nvlm.models.xattn_init import Drawn

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

    sources: dict[str, FileTensor | Drawn | torch.Tensor]
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


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, whole."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _header(path: Path, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    with safe_open(str(path), "pt") as f:
        sl = f.get_slice(key)
        return tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), torch.float32)


Folders = dict[str, tuple[Path, tuple[str, ...]]]
"""{model name prefix: (safetensors folder, key prefixes to try in its files)}: where a skeleton's meta weights are."""


def plan(model: Any, folders: Folders, seed: int | None, drawn: dict[str, Drawn] | None = None) -> Plan | None:
    """Where each parameter and buffer of `model` (a skeleton, ``nvlm.models.build``) comes from: its real
    tensors from themselves, `drawn` ones (a new model's x-attn blocks) drawn, the other meta ones from `folders`
    (added embedding rows drawn from `seed`). Every process computes the same plan from the same files and seeds;
    None: some weight is in none of the folders."""
    drawn = drawn or {}
    std = getattr(model.llm.config.get_text_config(), "initializer_range", 0.02)
    by_id = {id(p): n for n, p in model.named_parameters()}
    grown = {by_id[id(w)]: which for which, w in enumerate(embedding_weights(model.llm))}
    indexes = {prefix: tensor_index(folder) for prefix, (folder, _) in folders.items()}
    sources: dict[str, FileTensor | Drawn | torch.Tensor] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_meta:
            sources[name] = tensor.detach()
            continue
        if name in drawn:
            sources[name] = drawn[name]
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
def load(
    model: nn.Module,
    plan: Plan,
    device: torch.device | str | None = None,
    after: Callable[[str, nn.Module], None] | None = None,
) -> Plan:
    """Fill every parameter and buffer of the sharded `model` (after ``to_empty``) with this process's block.

    With `device`, `model` is still on meta: each module is made on `device` just before its own tensors are
    read, and `after(name, module)` runs once they are in place (``nvlm.inference.quantize`` quantizes a Linear
    there), so only one module is held in the file's precision at a time."""
    if device is None:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            _fill(tensor, plan.sources[clean_name(name)], plan)
        return plan
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if not any(clean_name(prefix + n) in plan.sources for n in own):
            continue  # no tensors, or only a tied weight (another module's): the caller ties it again
        module.to_empty(device=device, recurse=False)
        for local_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            src = plan.sources.get(clean_name(prefix + local_name))
            if src is not None:
                _fill(tensor, src, plan)
        if after is not None:
            after(name, module)
    return plan


def _fill(tensor: torch.Tensor, src: FileTensor | Drawn | torch.Tensor, plan: Plan) -> None:
    local, shape, offset = _block(tensor)
    if local.numel() == 0:
        return
    if isinstance(src, torch.Tensor):
        value = src[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
    elif isinstance(src, Drawn):
        value = src.block(shape, offset)
    else:
        value = _read(src, shape, offset, plan)
    local.copy_(value)
