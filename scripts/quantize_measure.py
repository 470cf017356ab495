"""Weight-only quantization measured on the demo's model: held-out accuracy per task, decode tokens/s and the
logits' largest error, full precision against each scheme, on the CPU.

    nvlm demo --quick --arch D --out runs/demo
    python scripts/quantize_measure.py runs/demo/nvlm-d/stage2/final runs/demo/data --schemes int8 int4

Accuracy: greedy answers to every held-out item of the demo's tasks (``nvlm.demo.pipeline.evaluate``, the demo's
own scoring). Speed: one text prompt, `--new-tokens` tokens decoded with no stop token, the decode steps timed
after the first token (the prefill) and the median of `--repeats` runs taken.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import nvlm
from nvlm.data.chat import chat_prompt
from nvlm.demo.pipeline import VISION_TASKS, evaluate
from nvlm.inference.generate import generate_ids


def decode_tokens_per_s(loaded: Any, new_tokens: int, repeats: int) -> float:
    model, processor = loaded
    batch = processor(chat_prompt("Count from one to one hundred.", 0), [])
    rates = []
    for _ in range(repeats):
        steps = generate_ids(model, batch, max_new_tokens=new_tokens, eos_token_ids=[])
        next(steps)  # the prefill's token
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def logits_error(full: Any, other: Any, data: Path) -> float:
    from nvlm.data.formats import read_records

    model, processor = full
    conv = next(iter(read_records(data / "test" / f"{VISION_TASKS[0]}.jsonl", image_root=data)))
    batch = processor(chat_prompt("What is in the picture?", len(conv.images)), conv.images)
    with torch.inference_mode():
        return float((other[0](**batch).logits - model(**batch).logits).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help="the demo's data folder (its test/ split)")
    p.add_argument("--schemes", nargs="+", default=["int8"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    tasks = (*VISION_TASKS, "add")
    full = nvlm.load(args.checkpoint, dtype=torch.float32)
    rows = {
        "fp32": {
            "accuracy": evaluate(full, data, tasks),
            "tokens_per_s": decode_tokens_per_s(full, args.new_tokens, args.repeats),
        }
    }
    for scheme in args.schemes:
        q = nvlm.load(args.checkpoint, dtype=torch.float32, quantize=scheme)
        rows[scheme] = {
            "accuracy": evaluate(q, data, tasks),
            "tokens_per_s": decode_tokens_per_s(q, args.new_tokens, args.repeats),
            "logits_max_abs_error": logits_error(full, q, data),
        }
    print(json.dumps(rows, indent=2))
    print(f"\n{'task':<12}" + "".join(f"{name:>10}" for name in rows))
    for task in tasks:
        print(f"{task:<12}" + "".join(f"{100 * r['accuracy'][task]['accuracy']:>10.1f}" for r in rows.values()))
    print(f"{'decode tok/s':<12}" + "".join(f"{r['tokens_per_s']:>10.1f}" for r in rows.values()))


if __name__ == "__main__":
    main()
