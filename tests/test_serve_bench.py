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


def test_encoder_cache_check_counts_hits_and_times_the_image_path(build_model):
    from nvlm.bench.engine_checks import encoder_cache_ttft

    model, processor = build_model("H")
    c = encoder_cache_ttft(model, processor, n=4)
    # the first request fills the cache, the other three hit it: its image, and for H its x-attn memory
    assert (c["encoder_cache_hits"], c["encoder_cache_queries"]) == (3, 4)
    assert (c["xattn_kv_cache_hits"], c["xattn_kv_cache_queries"]) == (3, 4)
    assert c["image_path_ms"] > 0 and c["ttft_p50_ms_cache_on"] > 0
    assert c["encoder_cache_ttft_ratio"] == c["ttft_p50_ms_cache_off"] / c["ttft_p50_ms_cache_on"]


def test_mailbox_delivers_every_event_in_order_with_one_wake_up_per_batch():
    import asyncio
    import threading

    from nvlm.serve.common import Mailbox

    async def scenario() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        box, queues = Mailbox(loop), [asyncio.Queue(), asyncio.Queue()]
        wakes = [0]
        plain = loop.call_soon_threadsafe

        def counted(*args):
            wakes[0] += 1
            return plain(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        # one "engine step" of 50 rows, posted from another thread while the loop is not running its callbacks
        poster = threading.Thread(target=lambda: [box.post(queues[i % 2], i) for i in range(50)])
        poster.start()
        poster.join()
        got = []
        while len(got) < 50:
            q = queues[len(got) % 2]
            got.append(await asyncio.wait_for(q.get(), 5))
        return got, wakes[0]

    got, wakes = asyncio.run(scenario())
    assert got == list(range(50))
    assert wakes == 1
