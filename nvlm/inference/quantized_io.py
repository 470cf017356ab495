"""``nvlm quantize SRC DST --scheme int8``: a quantized model written as safetensors, and read back.

    dst/
      config.json, tokenizer files, preprocessor_config.json   as in nvlm's format (``nvlm.models.saving``)
      llm/config.json, vision/config.json                      the backbones' configs (no weights there)
      quantization.json     {"format": "nvlm-quantized", "scheme", "keep", "tensors": torchao's per-tensor metadata}
      quantized-0000k-of-0000n.safetensors                     the plain tensors: each quantized weight as its
                                                               parts (int data, scales, zero points)

torchao's safetensors support (``torchao.prototype.safetensors``) splits each quantized tensor into plain
tensors and a JSON description, and rebuilds it on reading; only its allow-listed tensor classes are rebuilt
(no pickle). ``nvlm.load`` tells such a folder by its quantization.json and fills the skeleton with the
rebuilt tensors directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "nvlm-quantized"
MARKER = "quantization.json"
SHARD_BYTES = 5 * 10**9


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def save(model: Any, processor: Any, path: str | os.PathLike, scheme: str, keep: tuple[str, ...]) -> Path:
    """Write the quantized `model` (``nvlm.load(..., quantize=scheme)``) and its processor under `path`."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from nvlm.models.llm import config_dict

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.config.llm.hf_config = config_dict(model.llm)
    model.config.save(out / "config.json")
    processor.save_pretrained(out)
    for folder, module in (("llm", model.llm), ("vision", model.vision.model)):
        (out / folder).mkdir(exist_ok=True)
        module.config.save_pretrained(out / folder)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous().cpu()
        size += nbytes
    files = {}
    for i, shard in enumerate(shards):
        name = f"quantized-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.update(dict.fromkeys(shard, name))
    marker = {"format": FORMAT, "scheme": scheme, "keep": list(keep), "tensors": metadata, "weight_map": files}
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    marker = json.loads((Path(path) / MARKER).read_text())
    if marker.get("format") != FORMAT:
        raise ValueError(f"{path}/{MARKER}: format {marker.get('format')!r}, expected {FORMAT!r}")
    return marker


def read_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The saved state dict, quantized tensors rebuilt, each read straight to `device`."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    root = Path(path)
    marker = read_marker(root)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(marker["weight_map"].values())):
        with safe_open(str(root / name), "pt", device=str(device)) as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    state, leftover = unflatten_tensor_state_dict(tensors, marker["tensors"])
    if leftover:
        raise ValueError(f"{root}: tensors {sorted(leftover)[:5]} belong to no weight in {MARKER}")
    return state
