"""The Python parts of the device checks (scripts/gpu_correctness.sh, scripts/gpu_perf.sh): each subcommand
prints one JSON line.

    python scripts/gpu_smoke.py prepare OUT [--hidden 1024 --layers 8]   backbones, data, run config
      [--answer-words 1500 --max-seq-len 4096]                           long samples (activation memory)
    torchrun --nproc_per_node=1 scripts/gpu_smoke.py memory OUT --ac --no-compile --steps 2
    python scripts/gpu_smoke.py seeded-sampling OUT                      seeded generate on CUDA, twice
    python scripts/gpu_smoke.py packed-kernels OUT                       packed rows: flex vs dense-mask SDPA
    torchrun --nproc_per_node=1 scripts/gpu_smoke.py sync-points OUT --steps 3
    python scripts/gpu_smoke.py check-run RUN --steps N                  the metrics of a finished run
    python scripts/gpu_smoke.py check-stop RUN --log LOG                 a run stopped by SIGTERM saved its step

Run as a file (``python scripts/gpu_smoke.py``, ``torchrun scripts/gpu_smoke.py``) it imports the ``nvlm`` beside
it, installed or not. `prepare` refuses an OUT that already holds a run (a rerun would resume finished runs and
pass without training) unless given ``--fresh``, which clears it.

The runs use random backbones written to OUT (nothing is downloaded); `--hidden/--layers` size the LLM so that
activation memory, not weights, dominates. The figures are the device's: run it on the GPU to be measured.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, sys.path[0] is scripts/: import this checkout's nvlm
    sys.path.insert(0, str(ROOT))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="write random backbones, a dataset and run.json under OUT")
    prep.add_argument("out", type=Path)
    prep.add_argument("--hidden", type=int, default=1024)
    prep.add_argument("--layers", type=int, default=8)
    prep.add_argument("--samples", type=int, default=64)
    prep.add_argument("--fresh", action="store_true", help="clear OUT first if it exists")
    prep.add_argument("--answer-words", type=int, default=1, help="words per answer (long samples: 1500)")
    prep.add_argument("--max-seq-len", type=int, default=512)
    mem = sub.add_parser("memory", help="peak CUDA memory over a few sharded bf16 steps (under torchrun)")
    mem.add_argument("out", type=Path)
    mem.add_argument("--ac", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing")
    mem.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    mem.add_argument("--steps", type=int, default=6)
    mem.add_argument("--warmup", type=int, default=1, help="steps before the peak is reset (allocator, compile)")
    seeded = sub.add_parser("seeded-sampling", help="model.generate(do_sample=True, seed=0) on CUDA, twice")
    seeded.add_argument("out", type=Path)
    packed = sub.add_parser("packed-kernels", help="forward+backward of packed rows: FlexAttention vs dense mask")
    packed.add_argument("out", type=Path)
    packed.add_argument("--rows", type=int, default=2)
    packed.add_argument("--samples-per-row", type=int, default=8)
    packed.add_argument("--repeats", type=int, default=5)
    sync = sub.add_parser("sync-points", help="host-device syncs per step, torch.cuda.set_sync_debug_mode")
    sync.add_argument("out", type=Path)
    sync.add_argument("--steps", type=int, default=3)
    check = sub.add_parser("check-run", help="a finished run: steps 1..N logged once each, loss fell, checkpoint")
    check.add_argument("run", type=Path)
    check.add_argument("--steps", type=int, required=True)
    stop = sub.add_parser("check-stop", help="a SIGTERM-stopped run: its log's stop step has a complete checkpoint")
    stop.add_argument("run", type=Path)
    stop.add_argument("--log", type=Path, required=True, help="the stopped command's stdout")
    return p


def run_config(out: Path, **train: Any) -> dict[str, Any]:
    cfg = json.loads((out / "run.json").read_text())
    cfg["train"].update(train)
    return cfg


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from nvlm.testing.tiny import save_tiny_backbones

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.fresh:
            why = "a rerun would resume finished runs"
            raise SystemExit(f"error: {out} is not empty ({why}); pass --fresh to clear it")
        shutil.rmtree(out)
    llm, vision = save_tiny_backbones(out / "backbones", "qwen2", "internvl", hidden=args.hidden, layers=args.layers)
    (out / "data" / "img").mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    with open(out / "data" / "d.jsonl", "w") as f:
        for i in range(args.samples):
            name = " ".join([list(colors)[i % 3]] * args.answer_words)
            Image.new("RGB", (112, 56 + 28 * (i % 4)), colors[name.split()[0]]).save(out / "data" / "img" / f"{i}.png")
            turns = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": name}]
            f.write(json.dumps({"image": f"img/{i}.png", "conversations": turns}) + "\n")
    cfg = {
        "model": {"arch": "X", "llm": str(llm), "vision": str(vision)},
        "data": {"sources": [{"path": str(out / "data" / "d.jsonl")}], "max_seq_len": args.max_seq_len},
        "train": {
            "stage": "sft",
            "max_steps": 30,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 2,
            "bf16": True,
            "save_every": 10,
        },
    }
    (out / "run.json").write_text(json.dumps(cfg, indent=2))
    import nvlm

    return {"prepared": str(out), "hidden": args.hidden, "layers": args.layers, "nvlm": nvlm.__file__}


def _trainer(out: Path, run: str, **train: Any) -> Any:
    from nvlm.distributed.parallel import init_world
    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    world = init_world(timeout_s=600)
    return Trainer(RunConfig.from_dict(run_config(out, **train)), out / run, log=lambda *a, **k: None, world=world)


def _steps(trainer: Any, n: int) -> list[float]:
    return [trainer.optimizer_step(trainer._next_batches())[0] for _ in range(n)]


def memory(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    run = f"memory-ac{int(args.ac)}-compile{int(args.compile)}"
    trainer = _trainer(args.out, run, activation_checkpointing=args.ac, compile=args.compile)
    _steps(trainer, args.warmup)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = _steps(trainer, args.steps)
    torch.cuda.synchronize()
    return {
        "ac": args.ac,
        "compile": args.compile,
        "steps": args.steps,
        "s_per_step": (time.perf_counter() - t0) / args.steps,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def sync_points(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    trainer = _trainer(args.out, "sync-points")
    _steps(trainer, 2)  # warm-up: allocator, lazy inits
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(trainer, args.steps)
    torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"steps": args.steps, "syncs": len(syncs), "per_step": len(syncs) / args.steps, "top": where.most_common(10)}


def _built(out: Path) -> tuple[Any, Any]:
    """The prepared backbones as an NVLM-X model in bf16 on CUDA, and its processor."""
    import torch

    import nvlm

    cfg = json.loads((out / "run.json").read_text())["model"]
    model, processor = nvlm.build("X", llm=cfg["llm"], vision=cfg["vision"])
    return model.to("cuda", torch.bfloat16), processor


def seeded_sampling(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    model, processor = _built(args.out)
    image = Image.new("RGB", (112, 84), (200, 40, 40))
    runs = [model.chat(processor, "What color?", image=image, max_new_tokens=16, do_sample=True, seed=s)
            for s in (0, 0, 1)]  # fmt: skip
    return {"ok": runs[0] == runs[1], "same_seed_same_text": runs[0] == runs[1], "texts": runs}


def packed_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of packed rows (long text samples) with the LLM's attention as transformers' FlexAttention
    (block mask once per forward) and as SDPA over the dense [rows, 1, T, T] mask: ms per pass, peak GiB."""
    import torch

    from nvlm.data.packing import collate_packed

    model, processor = _built(args.out)
    model.train()
    n = args.rows * args.samples_per_row
    words = json.loads((args.out / "run.json").read_text())["data"]["max_seq_len"] // (2 * args.samples_per_row)
    samples = [processor.encode_segments([("Say it. ", False), (" ".join(["red"] * words), True)]) for _ in range(n)]
    rows = [samples[i : i + args.samples_per_row] for i in range(0, n, args.samples_per_row)]
    batch = collate_packed(rows, processor.tokenizer.pad_token_id or 0, processor.tokens_per_tile)
    out: dict[str, Any] = {"rows": args.rows, "width": int(batch["input_ids"].shape[1])}
    for kernel in ("flex_attention", "sdpa"):
        model.llm.set_attn_implementation(kernel)
        times = []
        for i in range(args.repeats + 1):  # the first: compilation, the allocator
            if i == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            r = model(**batch, return_logits=False)
            r.loss_sum.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30
        out[kernel] = {"ms": 1000 * min(times[1:]), "first_ms": 1000 * times[0], "peak_gib": peak,
                       "loss_sum": float(r.loss_sum)}  # fmt: skip
    return out


def check_run(args: argparse.Namespace) -> dict[str, Any]:
    from nvlm.distributed.dcp import complete_checkpoints
    from nvlm.training.metrics import read_metrics

    rows = read_metrics(args.run / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    done = complete_checkpoints(args.run / "checkpoints")
    ok = steps == list(range(1, args.steps + 1)) and rows[-1]["loss"] < rows[0]["loss"] and bool(done)
    return {
        "ok": ok,
        "steps": steps[-1] if steps else 0,
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "checkpoints": [p.name for p in done],
    }


def check_stop(args: argparse.Namespace) -> dict[str, Any]:
    """torchrun exits 1 after forwarding a SIGTERM even when its worker saved and exited 0, so the stop is
    judged by what it left: the trainer's "saved and stopped at step N" line and a complete checkpoint of step N."""
    from nvlm.distributed.dcp import complete_checkpoints

    text = args.log.read_text() if args.log.exists() else ""
    said = re.findall(r"saved and stopped at step (\d+)", text)
    done = complete_checkpoints(args.run / "checkpoints")
    step = int(said[-1]) if said else None
    last = int(done[-1].name.split("_")[-1]) if done else None
    return {"ok": step is not None and step == last, "stopped_at": step, "last_checkpoint": last}


COMMANDS = {
    "prepare": prepare,
    "memory": memory,
    "sync-points": sync_points,
    "check-run": check_run,
    "check-stop": check_stop,
    "seeded-sampling": seeded_sampling,
    "packed-kernels": packed_kernels,
}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    print(json.dumps({"cmd": args.cmd, **COMMANDS[args.cmd](args)}))


if __name__ == "__main__":
    main()
