"""`nvlm demo --quick` end to end: held-out accuracy above chance, results.json, a chat-able checkpoint.

python -m pytest tests/test_demo.py -q      (about 3 minutes on 2 cores; marked slow)
"""

from __future__ import annotations

import json

import pytest

from nvlm.cli import main


@pytest.mark.slow
def test_demo_quick_learns_every_task(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "fresh image" in printed
    assert "NVLM-D final" in printed and "stage 1 only" in printed  # each column named, not one head over two
    results = json.loads((out / "results.json").read_text())
    assert results["arch"] == "D" and results["wall_s"] > 0
    tasks = results["tasks"]
    assert set(tasks) == {"color", "quadrant", "count", "bars", "read"}
    ratios = {t: r["accuracy"] / r["chance"] for t, r in tasks.items()}
    assert all(r["n"] >= 100 for r in tasks.values())
    # clearly above chance on held-out images; per task with a margin for CPU-dependent float rounding,
    # which moves a 3-minute run's individual numbers (measured: 1.35–4.8× chance per task)
    assert sum(ratios.values()) / len(ratios) >= 1.75, ratios
    assert sum(v >= 1.5 - 1e-9 for v in ratios.values()) >= 2, ratios  # 0.3 / 0.2 is 1.4999999999999998
    assert min(ratios.values()) >= 0.75, ratios
    assert 0.0 <= results["text"]["backbone"] <= 1.0 and 0.0 <= results["text"]["final"] <= 1.0
    # stage 1 aligns: with the frozen LLM able to write captions its loss falls; measured on a loaded
    # machine, first three logged losses 2.00, 2.07, 1.49 → last three 1.17, 0.90, 0.87 (ratio 0.53); before the
    # fix it rose, 3.99, 2.61, 3.31 → 2.42, 4.58, 6.11 (ratio 1.32)
    stage1 = [
        json.loads(line)["loss"] for line in (out / "nvlm-d" / "stage1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(stage1) >= 6 and sum(stage1[-3:]) <= 0.75 * sum(stage1[:3]), stage1
    # the stage-1 model alone (LLM frozen) is evaluated on the same held-out sets, and the alignment reaches the
    # frozen LLM: above chance on some task. Measured (1 thread) with 240 stage-1 steps: 2 tasks for seed 0 and 3
    # for seed 1; with the former 80 steps, none for seed 1 (and none in an earlier seed-0 run)
    assert set(results["tasks_stage1"]) == set(tasks)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == tasks[t]["n"] for t, r in results["tasks_stage1"].items())
    assert any(r["accuracy"] > r["chance"] for r in results["tasks_stage1"].values()), results["tasks_stage1"]
    ckpt = results["runs"][0]["checkpoint"]
    assert (out / "nvlm-d" / "loss.png").is_file()
    assert (
        main(
            [
                "chat",
                "--model",
                ckpt,
                "--image",
                str(out / "fresh.png"),
                "--max-new-tokens",
                "3",
                "How many shapes are there?",
            ]
        )
        == 0
    )
