"""``nvlm bench serve``: bounded, loopback only, percentiles per level and the model.generate baseline.

python -m pytest tests/test_serve_bench.py -q
"""

from __future__ import annotations

import json

from conftest import save_pair

from nvlm.cli import main


def test_bench_serve_reports_levels_and_baseline(build_model, tmp_path, capsys):
    save_pair(build_model("X"), str(tmp_path / "m"))
    code = main(
        [
            "bench",
            "serve",
            "--model",
            str(tmp_path / "m"),
            "--concurrency",
            "1,3",
            "--num-prompts",
            "6",
            "--max-tokens",
            "4",
            "--image-ratio",
            "0.5",
            "--threads",
            "1",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for lv in result["levels"]:
        assert lv["completed"] == 6 and lv["failed"] == 0 and lv["output_tokens"] == 24
        assert lv["request_throughput"] > 0
        assert 0 < lv["p50_ttft_ms"] <= lv["p99_ttft_ms"] <= lv["p99_e2e_ms"]
        assert lv["p50_tpot_ms"] is not None and lv["p50_itl_ms"] is not None
    assert result["baseline"]["completed"] == 6 and result["baseline"]["request_throughput"] > 0


def test_bench_serve_refuses_non_loopback_targets(capsys):
    assert main(["bench", "serve", "--url", "http://10.1.2.3:8000"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert main(["bench", "serve"]) == 2
