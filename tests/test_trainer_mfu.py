"""The trainer's MFU in metrics.jsonl: model FLOPs from the batches' shapes
(``nvlm.training.flops.batch_flops``) / step time / the device's bf16 peak. CPU has no peak in the table, so a
CPU run logs no MFU; with a stated peak it does, and the figure is FLOPs / (time × peak).

python -m pytest tests/test_trainer_mfu.py -q
"""

from __future__ import annotations

import pytest
from conftest import write_color_dataset

from nvlm.training.config import RunConfig
from nvlm.training.flops import batch_flops
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import Trainer


def _cfg(backbones, data) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": [{"path": str(data / "images.jsonl")}], "max_seq_len": 256},
            "train": {"stage": "sft", "max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
        }
    )


def test_mfu_in_metrics_row(backbones, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 8, 0)
    cfg = _cfg(backbones, data)
    plain = Trainer(cfg, tmp_path / "cpu", log=lambda *a, **k: None)
    assert plain.peak_flops is None  # CPU: no published peak, no MFU
    plain.run()
    assert all("mfu" not in r for r in read_metrics(tmp_path / "cpu" / "metrics.jsonl"))

    t = Trainer(cfg, tmp_path / "peak", log=lambda *a, **k: None)
    t.peak_flops = 1e12  # a stated peak
    seen: list[int] = []
    step = t.optimizer_step

    def spy(batches):  # the FLOPs of exactly the batches each step trained on, computed here independently
        seen.append(sum(batch_flops(t.model, b, "sft") for b in batches))
        return step(batches)

    t.optimizer_step = spy  # type: ignore[method-assign]
    t.run()
    rows = read_metrics(tmp_path / "peak" / "metrics.jsonl")
    assert len(rows) == 2 and len(seen) == 2
    for row, flops in zip(rows, seen, strict=True):
        assert row["model_tflop"] == pytest.approx(flops / 1e12) and flops > 0
        step_s = 4 / row["samples_per_s"]
        assert row["mfu"] == pytest.approx(flops / (step_s * 1e12))
    assert t.mfu == rows[-1]["mfu"]
