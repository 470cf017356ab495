"""``nvlm bench serve``: a bounded load generator for an OpenAI-compatible server, in ``vllm bench serve``'s
vocabulary, plus the one-request-at-a-time ``model.generate`` baseline measured in the same run.

Per concurrency level it sends ``--num-prompts`` streamed chat requests (at most ``concurrency`` at once, the
whole level cut off at ``--timeout`` seconds) and reports TTFT (time to the first content chunk), TPOT ((E2E −
TTFT) / (output tokens − 1)), ITL (gaps between content chunks) and E2E latency percentiles p50/p90/p99, plus
request and output-token throughput. It talks to loopback addresses only: ``--model`` starts the server in
this process on 127.0.0.1; ``--url`` must name 127.0.0.1, ::1 or localhost. The load generator runs in a process of
its own, as ``vllm bench serve`` does: in the server's process its parsing of every streamed chunk would take the
interpreter lock from the engine and the HTTP server it measures. With ``--model`` the same prompts also go one
at a time through ``model.generate``; the continuous-batching gain is the ratio of request throughputs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.parse
from typing import Any

from PIL import Image

from nvlm.bench.prompts import make_prompts

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"--url {url!r}: nvlm bench serve only loads loopback servers (127.0.0.1, ::1, localhost)")


async def _one(client: Any, url: str, body: dict, headers: dict) -> dict:
    import httpx

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"ok": False, "ttft": None, "itl": [], "tokens": 0}
    last = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}"
                await r.aread()
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    rec["tokens"] = msg["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in msg.get("choices", [])):
                    now = time.perf_counter()
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                    elif last is not None:
                        rec["itl"].append(now - last)
                    last = now
        rec["e2e"] = time.perf_counter() - t0
        rec["ok"] = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = type(e).__name__
    return rec


async def run_level(url: str, bodies: list[dict], concurrency: int, timeout: float, api_key: str | None) -> dict:
    """One concurrency level: every body once, at most `concurrency` in flight, cut off after `timeout` s."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def guarded(body: dict) -> dict:
            async with sem:
                return await _one(client, url, body, headers)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(guarded(b)) for b in bodies]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        duration = time.perf_counter() - t0
    recs = [t.result() for t in done]
    return summarize(recs, duration, concurrency, len(pending))


def run_levels(url: str, bodies: list[dict], levels: list[int], timeout: float, api_key: str | None) -> list[dict]:
    """Every level in turn, from a fresh process (see the module docstring); a warm-up of two requests first."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_levels, url, bodies, levels, timeout, api_key).result()


def _levels(url: str, bodies: list[dict], levels: list[int], timeout: float, api_key: str | None) -> list[dict]:
    asyncio.run(run_level(url, bodies[:2], 2, timeout, api_key))  # warm-up: connections, the server's first steps
    return [asyncio.run(run_level(url, bodies, c, timeout, api_key)) for c in levels]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def summarize(recs: list[dict], duration: float, concurrency: int, cut_off: int = 0) -> dict:
    ok = [r for r in recs if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    series = {
        "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
        "e2e": [r["e2e"] for r in ok],
        "itl": [x for r in ok for x in r["itl"]],
        "tpot": [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["ttft"] and r["tokens"] > 1],
    }
    out = {
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "cut_off": cut_off,
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": tokens / duration,
        "output_tokens": tokens,
    }
    for name, values in series.items():
        for q in (50, 90, 99):
            p = _pct(values, q)
            out[f"p{q}_{name}_ms"] = None if p is None else 1000 * p
    return out


def baseline(loaded: Any, prompts: list[tuple[str, list[Any]]], max_tokens: int, timeout: float) -> dict:
    """The same prompts one at a time through ``model.generate`` (greedy), cut off after `timeout` s;
    `loaded`: (model, processor).

    It runs on a fresh thread, as the engine's worker does: on a loaded CPU, torch's intra-op thread pool
    behaves very differently on the main thread (we saw 550 vs 19 ms per request for the demo model), and
    the ratio must measure batching, not that."""
    import threading

    out: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: out.update(_baseline(loaded, prompts, max_tokens, timeout)))
    worker.start()
    worker.join()
    return out


def _baseline(loaded: Any, prompts: list[tuple[str, list[Any]]], max_tokens: int, timeout: float) -> dict:
    from nvlm.data.chat import chat_prompt

    model, processor = loaded
    t0, n, tokens = time.perf_counter(), 0, 0
    for question, images in prompts:
        text = model.generate(processor, chat_prompt(question, len(images)), images, max_new_tokens=max_tokens)
        tokens += len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        n += 1
        if time.perf_counter() - t0 > timeout:
            break
    duration = time.perf_counter() - t0
    return {
        "completed": n,
        "duration_s": duration,
        "request_throughput": n / duration,
        "output_throughput": tokens / duration,
    }


def bodies_for(prompts: list[tuple[str, list[Any]]], max_tokens: int, model_name: str) -> list[dict]:
    out = []
    for question, images in prompts:
        parts = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
        out.append(
            {
                "model": model_name,
                "messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return out


def render(result: dict) -> str:
    cols = [
        ("conc", "concurrency", "{:>4}"),
        ("done", "completed", "{:>5}"),
        ("fail", "failed", "{:>4}"),
        ("req/s", "request_throughput", "{:>7.2f}"),
        ("tok/s", "output_throughput", "{:>7.1f}"),
    ]
    stats = [f"p{q}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2e") for q in (50, 90, 99)]
    head = " ".join(f"{h:>{7 if h not in ('conc', 'done', 'fail') else 5}}" for h, _, _ in cols)
    lines = [head + " " + " ".join(f"{s.removesuffix('_ms'):>10}" for s in stats) + "  (ms)"]
    for row in result["levels"]:
        vals = " ".join(f.format(row[k]) for _, k, f in cols)
        lines.append(vals + " " + " ".join(f"{row[s]:>10.1f}" if row[s] is not None else f"{'-':>10}" for s in stats))
    b = result.get("baseline")
    if b:
        lines.append(
            f"one at a time (model.generate): {b['request_throughput']:.2f} req/s, "
            f"{b['output_throughput']:.1f} tok/s over {b['completed']} requests"
        )
        for row in result["levels"]:
            lines.append(
                f"  concurrency {row['concurrency']}: {row['request_throughput'] / b['request_throughput']:.2f}× "
                "the request throughput of one-at-a-time serving"
            )
    if result.get("engine_checks"):
        from nvlm.bench.engine_checks import render_engine_checks

        lines.append(render_engine_checks(result["engine_checks"]))
    return "\n".join(lines)


def add_bench_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="load an OpenAI-compatible server: TTFT/TPOT/ITL/E2E percentiles, throughput",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", help="a saved model: serve it in this process on 127.0.0.1 and run the baseline")
    p.add_argument("--url", help="a running loopback server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--image-ratio", type=float, default=0.5, help="share of requests with one image")
    p.add_argument("--timeout", type=float, default=600, help="seconds per level (and for the baseline)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time model.generate baseline")
    p.add_argument(
        "--engine-checks",
        action="store_true",
        help="with --model: also the encoder cache's TTFT gain and host time per token at 32 vs 512 tokens",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (with --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_bench_serve)


def run_bench_serve(args: Any) -> int:
    import sys

    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        if not levels or min(levels) < 1 or args.num_prompts < 1 or args.max_tokens < 1 or args.timeout <= 0:
            raise ValueError("--concurrency levels, --num-prompts, --max-tokens and --timeout must be positive")
        if not 0 <= args.image_ratio <= 1:
            raise ValueError("--image-ratio must be within [0, 1]")
        if not args.model and not args.url:
            raise ValueError("give --model (serve it here) or --url (a running loopback server)")
        if args.url:
            check_loopback(args.url)
    except ValueError as e:
        print(f"nvlm bench serve: {e}", file=sys.stderr)
        return 2
    prompts = make_prompts(args.num_prompts, args.image_ratio, args.seed)
    model = None
    if args.model:
        import torch

        from nvlm.serve.server import load_model

        torch.set_num_threads(args.threads)
        model = load_model(args.model)
    result: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "func" and k != "api_key"},
        "levels": [],
        "baseline": None,
    }
    if model is not None and not args.no_baseline:
        baseline(model, prompts[:2], args.max_tokens, args.timeout)  # warm-up
        result["baseline"] = baseline(model, prompts, args.max_tokens, args.timeout)
    bodies = bodies_for(prompts, args.max_tokens, "nvlm")
    if args.url:
        url = args.url.rstrip("/").removesuffix("/v1")
        result["levels"] = run_levels(url, bodies, levels, args.timeout, args.api_key)
    else:
        from nvlm.serve.app import create_app
        from nvlm.serve.engine import Engine
        from nvlm.serve.server import BackgroundServer

        assert model is not None  # without --url, --model is required (checked above)
        engine = Engine(model[0], model[1], max_batch=max(levels), max_queue=max(levels))
        with BackgroundServer(create_app(engine, model_name="nvlm")) as url:
            result["levels"] = run_levels(url, bodies, levels, args.timeout, args.api_key)
    if model is not None and args.engine_checks:
        from nvlm.bench.engine_checks import run_engine_checks

        result["engine_checks"] = run_engine_checks(model)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
