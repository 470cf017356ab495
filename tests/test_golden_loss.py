"""A golden loss curve: the first 30 losses of a seeded tiny NVLM-D stage-2 run, stored in ``tests/assets``.

It fails when training numerics change (the loss path, the optimizer, the schedule, data order, the model's
wiring), so such a change is made on purpose: regenerate with ``NVLM_REGEN_GOLDEN=1 python -m pytest
tests/test_golden_loss.py`` and say why in the commit. One thread, so the reduction order is fixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_color_dataset

from nvlm.training.config import RunConfig
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import Trainer

GOLDEN = Path(__file__).parent / "assets" / "golden_loss_tiny_d.json"
STEPS = 30


def test_tiny_d_loss_curve_matches_the_golden_one(backbones, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 24, 8)
    cfg = RunConfig.from_dict(
        {
            "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {
                "sources": [{"path": str(data / "images.jsonl"), "weight": 3}, {"path": str(data / "text.jsonl")}],
                "max_seq_len": 256,
                "prefetch": 0,
            },
            "train": {
                "stage": "sft",
                "max_steps": STEPS,
                "global_batch_size": 2,
                "micro_batch_size": 1,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 3,
                "seed": 0,
                "num_threads": 1,
                "save_every": 0,
            },
        }
    )
    threads = torch.get_num_threads()
    try:
        Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None).run()
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == STEPS
    if os.environ.get("NVLM_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())["losses"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, golden))
    assert worst <= 1e-4, f"loss curve moved from the golden one by up to {worst:.2e} (relative): {losses}"
    assert losses[-1] < 0.5 * losses[0]  # and it is a training curve: the loss falls
