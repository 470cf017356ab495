"""The exported backbones' config.json names the dtype their weights were written in: a bf16 export
of an fp32 master copy must not say float32, or ``dtype="auto"`` loads it at twice the size.

python -m pytest tests/test_export_dtype.py -q
"""

from __future__ import annotations

import json

import torch
from conftest import save_pair
from safetensors import safe_open

import nvlm
from nvlm.distributed.dcp import export_pretrained
from nvlm.distributed.parallel import World


def test_bf16_export_says_bf16_and_loads_as_bf16(build_model, tmp_path):
    model, processor = build_model("X")  # fp32, as the trainer's master copy
    assert model.llm.dtype == torch.float32
    export_pretrained(model, processor, tmp_path / "final", World(), torch.bfloat16)
    for folder in ("llm", "vision"):
        cfg = json.loads((tmp_path / "final" / folder / "config.json").read_text())
        assert cfg["dtype"] == "bfloat16", (folder, cfg.get("dtype"))
        with safe_open(str(tmp_path / "final" / folder / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, folder
    loaded, loaded_proc = nvlm.load(tmp_path / "final")  # transformers' default: the config's dtype
    assert loaded.llm.dtype == torch.bfloat16


def test_fp32_export_says_fp32(build_model, tmp_path):
    save_pair(build_model("D"), str(tmp_path / "m"))
    for folder in ("llm", "vision"):
        assert json.loads((tmp_path / "m" / folder / "config.json").read_text())["dtype"] == "float32"
