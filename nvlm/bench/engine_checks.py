"""Engine measurements of ``nvlm bench serve --model`` that need no HTTP: what the encoder cache saves and how
host work per token grows with the answer length. Each compares two runs side by side in one process, so a
shared machine's load affects both alike.

- encoder cache: the same 6+1-tile image sent `n` times with different questions, one request after the other;
  time to first token p50 with the cache and without (``Engine(encoder_cache_gb=0)``), the prefix cache off in
  both (a prompt that starts with the same image would otherwise skip the image's tokens altogether), the cache's
  hits, and the image path's own time (vision tower and projector): the most a cache of its output can save.
- prefix cache: `n` requests sharing a ~512-token system prompt, one after the other; prompt tokens the
  prefills computed with the cache and without.
- chunked prefill: `rows` streams decoding when a ~2000-token prompt arrives; the p99 gap between their tokens
  while it is prefilled, in chunks of 128 tokens and in one piece.
- host time per token: `rows` requests decoded together to 32 and to 512 tokens; each decoding step's time
  minus its model forward, per row.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from nvlm.bench.prompts import QUESTIONS, draw_image, make_prompts


def _ttft_p50(model: Any, processor: Any, image: Any, n: int, cache_gb: float) -> tuple[float, dict[str, int]]:
    from nvlm.data.chat import chat_prompt
    from nvlm.serve.engine import Engine, SamplingParams

    engine = Engine(model, processor, encoder_cache_gb=cache_gb, prefix_cache=False).start()  # the encoder alone
    try:
        ttfts = []
        for i in range(n):
            r = engine.submit(chat_prompt(QUESTIONS[i % len(QUESTIONS)], 1), [image], SamplingParams(max_tokens=2))
            r.result()
            assert r.t_first is not None
            ttfts.append(r.t_first - r.t_submit)
    finally:
        engine.close()
    # the first request fills the cache: the repeats are what is measured
    return statistics.median(ttfts[1:]), dict(engine.metrics.counts)


def _image_path_ms(model: Any, processor: Any, image: Any, n: int) -> float:
    """Median time of the image path alone (vision tower and projector) for `image`'s tiles."""
    import torch

    from nvlm.data.chat import chat_prompt

    pixels = processor.encode(chat_prompt(QUESTIONS[0], 1), [image]).pixel_values  # [tiles, 3, S, S]
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            model.encode_tiles(pixels)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def encoder_cache_ttft(model: Any, processor: Any, n: int = 16) -> dict[str, float]:
    """The same 1000×800 image (6 tiles and the thumbnail, the paper's example) `n` times with other questions."""
    image = draw_image(random.Random(1), 1000, 800)
    _ttft_p50(model, processor, image, 2, 0.0)  # warm-up
    off, _ = _ttft_p50(model, processor, image, n, 0.0)
    on, counts = _ttft_p50(model, processor, image, n, 1.0)
    out = {
        "ttft_p50_ms_cache_off": 1000 * off,
        "ttft_p50_ms_cache_on": 1000 * on,
        "encoder_cache_ttft_ratio": off / on,
        "image_path_ms": _image_path_ms(model, processor, image, n),
        "encoder_cache_hits": counts.get("encoder_cache_hits", 0),
        "encoder_cache_queries": counts.get("encoder_cache_queries", 0),
    }
    if counts.get("xattn_kv_cache_queries"):
        out["xattn_kv_cache_hits"] = counts.get("xattn_kv_cache_hits", 0)
        out["xattn_kv_cache_queries"] = counts["xattn_kv_cache_queries"]
    return out


def prefix_cache_drop(model: Any, processor: Any, n: int = 16) -> dict[str, float]:
    from nvlm.data.chat import chat_prompt
    from nvlm.serve.engine import Engine, SamplingParams

    system = "You are a careful assistant. Answer in one short sentence, and say so when unsure. " * 40
    words = len(processor.tokenizer(system)["input_ids"])
    system = system[: len(system) * 512 // words]  # about 512 tokens
    computed = {}
    for on in (False, True):
        engine = Engine(model, processor, prefix_cache=on).start()
        try:
            for i in range(n):
                engine.submit(
                    chat_prompt(QUESTIONS[i % len(QUESTIONS)], 0, system), [], SamplingParams(max_tokens=2)
                ).result()
        finally:
            engine.close()
        computed[on] = engine.metrics.counts["prefill_tokens_computed"]
    return {
        "prefill_tokens_cache_off": computed[False],
        "prefill_tokens_cache_on": computed[True],
        "prefix_cache_prefill_drop": 1 - computed[True] / computed[False],
    }


def _itl_p99_during_long_prompt(model: Any, processor: Any, rows: int, chunk: int, long_text: str) -> float:
    from nvlm.data.chat import chat_prompt
    from nvlm.serve.engine import Engine, SamplingParams

    engine = Engine(model, processor, max_prefill_tokens=chunk).start()
    stamps: list[list[float]] = [[] for _ in range(rows)]
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        streams = []
        for i in range(rows):
            prompt = chat_prompt(QUESTIONS[i % len(QUESTIONS)], 0)
            streams.append(
                engine.submit(prompt, [], params, on_event=lambda e, i=i: stamps[i].append(time.perf_counter()))
            )
        while min(len(s) for s in stamps) < 4:
            time.sleep(0.001)
        t0 = time.perf_counter()
        engine.submit(chat_prompt(long_text, 0), [], SamplingParams(max_tokens=1)).result()
        t1 = time.perf_counter()
        for r in streams:
            r.cancel()
    finally:
        engine.close()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if t0 <= b <= t1 + 0.05]
    return sorted(gaps)[min(len(gaps) - 1, round(0.99 * (len(gaps) - 1)))] if gaps else float("nan")


def chunked_prefill_itl(model: Any, processor: Any, rows: int = 8) -> dict[str, float]:
    words = "the quick brown fox jumps over the lazy dog and keeps running far away "
    n = len(processor.tokenizer(words)["input_ids"])
    long_text = words * (2000 // n)
    whole = _itl_p99_during_long_prompt(model, processor, rows, 16384, long_text)
    chunked = _itl_p99_during_long_prompt(model, processor, rows, 128, long_text)
    return {"itl_p99_ms_one_piece": 1000 * whole, "itl_p99_ms_chunked": 1000 * chunked}


def host_ms_per_token(model: Any, processor: Any, tokens: int, rows: int = 16) -> dict[str, float]:
    """Decoding steps of `rows` requests to `tokens` tokens: (step − model forward) / rows, in ms."""
    from nvlm.data.chat import chat_prompt
    from nvlm.serve.engine import Engine, SamplingParams

    forward = [0.0]
    plain = model.forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = plain(*args, **kwargs)
        if "position_ids" in kwargs:  # a decoding step (prefills give no positions)
            forward[0] += time.perf_counter() - t0
        return out

    model.forward = timed
    engine = Engine(model, processor, max_batch=rows).start()
    try:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        with engine.hold():
            reqs = [engine.submit(chat_prompt(q, len(im)), im, params) for q, im in make_prompts(rows, 0.5)]
        for r in reqs:
            r.result()
    finally:
        engine.close()
        del model.forward
    h = engine.metrics.decode_step
    return {
        "steps": h.count,
        "step_ms": 1000 * h.sum / h.count,
        "forward_ms": 1000 * forward[0] / h.count,
        "host_ms_per_token": 1000 * (h.sum - forward[0]) / h.count / rows,
    }


def run_engine_checks(loaded: Any) -> dict[str, Any]:
    """All of the above on a fresh thread (as the engine's worker runs; see ``nvlm.bench.serve.baseline``)."""
    import threading

    model, processor = loaded
    out: dict[str, Any] = {}

    def work() -> None:
        out.update(encoder_cache_ttft(model, processor))
        out.update(prefix_cache_drop(model, processor))
        out.update(chunked_prefill_itl(model, processor))
        host_ms_per_token(model, processor, 8)  # warm-up
        for n in (32, 512):
            step = host_ms_per_token(model, processor, n)
            out[f"host_ms_per_token_{n}"] = step["host_ms_per_token"]
            out[f"decode_step_ms_{n}"], out[f"decode_forward_ms_{n}"] = step["step_ms"], step["forward_ms"]

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return out


def render_engine_checks(c: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"encoder cache, same 6+1-tile image {16}x: TTFT p50 {c['ttft_p50_ms_cache_off']:.1f} ms without, "
            f"{c['ttft_p50_ms_cache_on']:.1f} ms with ({c['encoder_cache_ttft_ratio']:.2f}x lower); "
            f"hits {c['encoder_cache_hits']}/{c['encoder_cache_queries']} images"
            + (
                f", {c['xattn_kv_cache_hits']}/{c['xattn_kv_cache_queries']} x-attn memories"
                if "xattn_kv_cache_queries" in c
                else ""
            )
            + f"; the image path alone takes {c['image_path_ms']:.1f} ms",
            f"prefix cache, 16 requests sharing a 512-token system prompt: {c['prefill_tokens_cache_off']} prompt "
            f"tokens computed without, {c['prefill_tokens_cache_on']} with "
            f"({100 * c['prefix_cache_prefill_drop']:.0f}% fewer)",
            f"a 2000-token prompt arriving while 8 streams decode: their p99 inter-token gap "
            f"{c['itl_p99_ms_one_piece']:.1f} ms prefilled in one piece, "
            f"{c['itl_p99_ms_chunked']:.1f} ms in 128-token chunks",
            f"host time per token (16 rows): {c['host_ms_per_token_32']:.3f} ms at 32 tokens, "
            f"{c['host_ms_per_token_512']:.3f} ms at 512 tokens; a decoding step of 16 rows "
            f"{c['decode_step_ms_32']:.2f} ms ({c['decode_forward_ms_32']:.2f} of it the model's forward) at 32 "
            f"tokens, {c['decode_step_ms_512']:.2f} ms ({c['decode_forward_ms_512']:.2f}) at 512",
        ]
    )
