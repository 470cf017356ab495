"""Weight-only quantization measured on the demo's model: held-out accuracy per task, decode tokens/s and the
logits' largest error, full precision against each scheme, on the CPU.

    nvlm demo --quick --arch D --out runs/demo
    python scripts/quantize_measure.py runs/demo/nvlm-d/stage2/final --data runs/demo/data --schemes int8 int4
    python scripts/quantize_measure.py /tmp/random-d --random 1024 8     # speed only: a random Qwen2 NVLM-D

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
    p.add_argument("checkpoint", help="an nvlm checkpoint (with --random: where to write a random one)")
    p.add_argument("--data", default=None, help="the demo's data folder (its test/ split): accuracy per task")
    p.add_argument("--random", nargs=2, type=int, metavar=("HIDDEN", "LAYERS"), help="write a random model first")
    p.add_argument("--schemes", nargs="+", default=["int8"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.random:
        write_random(Path(args.checkpoint), *args.random)
    data = Path(args.data) if args.data else None
    tasks = (*VISION_TASKS, "add")
    rows: dict[str, dict[str, Any]] = {}
    full = nvlm.load(args.checkpoint, dtype=torch.float32)
    for scheme in ("fp32", *args.schemes):
        loaded = full if scheme == "fp32" else nvlm.load(args.checkpoint, dtype=torch.float32, quantize=scheme)
        row: dict[str, Any] = {"tokens_per_s": decode_tokens_per_s(loaded, args.new_tokens, args.repeats)}
        if data is not None:
            row["accuracy"] = evaluate(loaded, data, tasks)
            row["logits_max_abs_error"] = logits_error(full, loaded, data)
        rows[scheme] = row
    print(json.dumps(rows, indent=2))
    print(f"\n{'':<14}" + "".join(f"{name:>10}" for name in rows))
    if data is not None:
        for task in tasks:
            print(f"{task:<14}" + "".join(f"{100 * r['accuracy'][task]['accuracy']:>10.1f}" for r in rows.values()))
    print(f"{'decode tok/s':<14}" + "".join(f"{r['tokens_per_s']:>10.1f}" for r in rows.values()))


def write_random(path: Path, hidden: int, layers: int) -> None:
    """A random NVLM-D over a Qwen2 LLM of `hidden` × `layers` (FFN 4 × hidden) and a tiny vision tower."""
    from transformers import Qwen2Config

    from nvlm.testing.tiny import tiny_tokenizer, tiny_vision_config

    torch.manual_seed(0)
    llm = Qwen2Config(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
    )
    model, processor = nvlm.build("D", llm=llm, vision=tiny_vision_config(), tokenizer=tiny_tokenizer())
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))


if __name__ == "__main__":
    main()
