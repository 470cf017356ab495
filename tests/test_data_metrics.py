"""metrics.jsonl reports the data side of every step: how long the step waited on the loader, and how many
samples were kept at fewer tiles (degraded), dropped as too long, or skipped as bad.

python -m pytest tests/test_data_metrics.py -q
"""

from __future__ import annotations

import json

from conftest import write_color_dataset

from nvlm.training.config import RunConfig
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import Trainer


def test_each_step_logs_its_data_wait_and_degraded_dropped_and_bad_samples(backbones, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 6, 0)  # pictures of 56x56, 112x56, 150x100; a broken one
    with open(data / "essay.jsonl", "w") as f:  # text that fits no sequence: dropped
        for i in range(3):
            turns = [{"from": "human", "value": "Tell me more. " * 60}, {"from": "gpt", "value": str(i)}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    sources = [{"path": str(data / n), "weight": w} for n, w in (("images.jsonl", 4), ("broken.jsonl", 1),
                                                                  ("essay.jsonl", 1))]  # fmt: skip
    cfg = RunConfig.from_dict({
        "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": sources, "max_seq_len": 60},  # 150x100 at 6+1 tiles is over 60 tokens: degraded
        "train": {"max_steps": 6, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
                  "min_lr": 1e-4}})  # fmt: skip
    result = Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 6
    assert all(isinstance(r["data_wait_s"], float) and 0 <= r["data_wait_s"] < 60 for r in rows)
    for key, count in (("samples_degraded", "degraded"), ("samples_dropped", "dropped_too_long"),
                       ("samples_bad", "bad_sample")):  # fmt: skip
        per_step = [r[key] for r in rows]
        assert all(isinstance(v, int) and v >= 0 for v in per_step)
        assert sum(per_step) == result.counts.get(count, 0) > 0, (key, per_step, result.counts)
