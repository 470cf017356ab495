"""``nvlm bench structured``: what structured outputs cost per generated token, with a grammar and without, side by
side in one process (rounds alternate, so a shared machine's load falls on both alike).

The engine decodes `--requests` chat requests, `--rows` at a time, to at most `--max-tokens` tokens: once free
(``ignore_eos``, so every answer runs to the end) and once constrained to a JSON Schema (nested objects, an enum,
an array of objects; compiled once, before timing). Per output token it reports the decoding steps' time (model
forward included) over the steps with every row busy (constrained answers end at different lengths, and a
step of fewer rows costs more per token whatever the grammar), and, of the constrained run, the grammar's own
share (bitmask fill and apply, matcher advance, over all its tokens).
Without ``--model`` it builds a tiny random NVLM-D whose tokenizer is a byte-level BPE of ``--vocab`` tokens
trained on the Python standard library's sources, so the mask is a real vocabulary's size while the forward
costs little: the added microseconds carry over to a real model, the ratio does not (a large model's forward
is many times longer).
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nvlm.serve.metrics import EngineMetrics

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["invoice", "receipt", "form"]},
        "total": {"type": "number"},
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 10}, "qty": {"type": "integer"}},
                "required": ["name", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "kind", "total", "items"],
    "additionalProperties": False,
}


def tiny_model(vocab: int) -> tuple[Any, Any]:
    """A tiny NVLM-D over a `vocab`-token BPE trained on the standard library's sources (model, processor)."""
    import nvlm
    from nvlm.testing.tiny import tiny_llm_config, tiny_tokenizer, tiny_vision_config
    from nvlm.vision.encoder import vision_model_from_config

    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:400]
    tokenizer = tiny_tokenizer(vocab, [Path(f).read_text(errors="ignore") for f in files])
    from transformers import AutoModelForCausalLM

    root = Path(tempfile.mkdtemp(prefix="nvlm-bench-structured-"))
    AutoModelForCausalLM.from_config(tiny_llm_config("qwen2", len(tokenizer))).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision_model_from_config("internvl", tiny_vision_config("internvl").to_dict()).save_pretrained(root / "vision")
    model, processor = nvlm.build("D", llm=str(root / "llm"), vision=str(root / "vision"))
    return model.eval(), processor


class _Steps(EngineMetrics):
    """The engine's metrics, also keeping each decoding step's (seconds, rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[float, int]] = []

    def observe_step(self, kind: str, seconds: float, size: int) -> None:
        super().observe_step(kind, seconds, size)
        if kind == "decode":
            self.steps.append((seconds, size))


def _run(engine: Any, params: Any, requests: int, rows: int) -> tuple[float, list[Any]]:
    """All requests through `engine` → (µs per token of its decoding steps with all `rows` busy, the requests)."""
    from nvlm.bench.prompts import QUESTIONS
    from nvlm.data.chat import chat_prompt

    steps: list[tuple[float, int]] = engine.metrics.steps
    first = len(steps)
    with engine.hold():
        reqs = [engine.submit(chat_prompt(QUESTIONS[i % len(QUESTIONS)], 0), [], params) for i in range(requests)]
    for r in reqs:
        r.result()
    full = [(s, n) for s, n in steps[first:] if n == rows]
    tokens = sum(n for _, n in full)
    return (1e6 * sum(s for s, _ in full) / tokens if tokens else float("nan")), reqs


def _grammar_clock() -> tuple[list[float], Any]:
    """Time spent in the grammar's calls (mask, advance) while installed; the restore function."""
    from nvlm.serve import grammar

    spent = [0.0]
    plain_apply, plain_accept = grammar.TokenMasks.apply, grammar.Matcher.accept

    def apply(self: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        plain_apply(self, *args)
        spent[0] += time.perf_counter() - t0

    def accept(self: Any, token: int) -> None:
        t0 = time.perf_counter()
        plain_accept(self, token)
        spent[0] += time.perf_counter() - t0

    grammar.TokenMasks.apply, grammar.Matcher.accept = apply, accept  # type: ignore[method-assign, assignment]

    def restore() -> None:
        grammar.TokenMasks.apply, grammar.Matcher.accept = plain_apply, plain_accept  # type: ignore[method-assign]

    return spent, restore


def measure(model: Any, processor: Any, rows: int, requests: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    from nvlm.serve.engine import Engine, SamplingParams
    from nvlm.serve.grammar import Spec, grammars_for

    engine = Engine(model, processor, max_batch=rows, max_queue=requests, prefix_cache=False, metrics=_Steps())
    engine.start()
    try:
        t0 = time.perf_counter()
        grammars = grammars_for(engine)
        t1 = time.perf_counter()
        compiled = grammars.compile(Spec.of_schema(SCHEMA, strict=True))
        t2 = time.perf_counter()
        free = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
        shaped = SamplingParams(max_tokens=max_tokens, temperature=1.0, grammar=compiled)
        _run(engine, free, rows, rows), _run(engine, shaped, rows, rows)  # warm-up
        per: dict[str, list[float]] = {"free": [], "json": [], "grammar": []}
        parsed = finished = 0
        for _ in range(rounds):
            per["free"].append(_run(engine, free, requests, rows)[0])
            spent, restore = _grammar_clock()
            try:
                us, reqs = _run(engine, shaped, requests, rows)
            finally:
                restore()
            per["json"].append(us)
            per["grammar"].append(1e6 * spent[0] / sum(len(r.output_ids) for r in reqs))  # each token was masked
            for r in reqs:
                finished += r.finish_reason == "stop"
                parsed += r.finish_reason == "stop" and _parses(r.text)
    finally:
        engine.close()
    free_us, json_us = statistics.median(per["free"]), statistics.median(per["json"])
    return {
        "vocab": len(processor.tokenizer),
        "tokenizer_info_ms": 1e3 * (t1 - t0),
        "compile_ms": 1e3 * (t2 - t1),
        "us_per_token_free": free_us,
        "us_per_token_json": json_us,
        "ratio": json_us / free_us,
        "grammar_us_per_token": statistics.median(per["grammar"]),
        "stopped": finished,
        "parsed": parsed,
        "answers": rounds * requests,
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"vocabulary {r['vocab']} tokens; tokenizer info {r['tokenizer_info_ms']:.1f} ms (once per model), "
            f"schema compiled in {r['compile_ms']:.1f} ms (once per schema)",
            f"per output token (decoding steps with every row busy, forward included): "
            f"{r['us_per_token_free']:.1f} us without a grammar, {r['us_per_token_json']:.1f} us with a JSON "
            f"schema ({r['ratio']:.2f}x)",
            f"of which the grammar (bitmask fill + apply, matcher advance): {r['grammar_us_per_token']:.1f} us "
            "per constrained token",
            f"constrained answers ended by the grammar: {r['stopped']}/{r['answers']}, of which "
            f"{r['parsed']} parse as JSON (the others reached --max-tokens)",
        ]
    )


def add_bench_structured_parser(sub: Any) -> None:
    p = sub.add_parser(
        "structured",
        help="structured outputs: us per output token with a JSON schema vs without, side by side",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", help="a saved model (default: a tiny random NVLM-D with a --vocab tokenizer)")
    p.add_argument("--vocab", type=int, default=32000, help="the tiny model's vocabulary (default 32000)")
    p.add_argument("--rows", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, medians reported (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_bench_structured)


def run_bench_structured(args: Any) -> int:
    if min(args.rows, args.requests, args.max_tokens, args.rounds, args.threads) < 1 or args.vocab < 300:
        print(
            "nvlm bench structured: --rows, --requests, --max-tokens, --rounds, --threads must be positive "
            "and --vocab at least 300",
            file=sys.stderr,
        )
        return 2
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        from nvlm.serve.grammar import INSTALL

        print(f"nvlm bench structured: {INSTALL}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    if args.model:
        from nvlm.serve.server import load_model

        model, processor = load_model(args.model)
    else:
        model, processor = tiny_model(args.vocab)
    out: dict[str, Any] = {}
    # on a fresh thread, as the engine's callers run (see nvlm.bench.serve.baseline)
    worker = threading.Thread(
        target=lambda: out.update(measure(model, processor, args.rows, args.requests, args.max_tokens, args.rounds))
    )
    worker.start()
    worker.join()
    print(json.dumps(out, indent=2) if args.json else render(out))
    return 0
