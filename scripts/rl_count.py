"""GRPO or more SFT on the demo's ``count`` task from a demo's stage-2 model, with held-out accuracy before/after.

    python scripts/rl_count.py --demo runs/demo --arch D --stage grpo --steps 40 --lr 5e-5 --out runs/rl-count

The third stage is ``nvlm.repro.rl``'s (count data only, constant lr; SFT takes prompts × group samples a step,
as many labelled sequences as GRPO trains on). Prints one JSON line: accuracy on held-out ``count`` (1-5 shapes),
``count_wide`` (8-9 tile canvases) and ``count_many`` (6-7 shapes) for the start and the end model, the mean
reward of the first and last steps, and the seconds spent in rollouts and in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", required=True, help="an `nvlm demo` output folder (data/, backbones/, nvlm-*/)")
    p.add_argument("--arch", default="D", choices=["D", "X", "H"])
    p.add_argument("--stage", default="grpo", choices=["grpo", "sft"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=8, help="images a step (SFT: × --group samples)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl", type=float, default=0.0)
    p.add_argument("--updates", type=int, default=1, help="GRPO: optimizer updates per rollout batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", help="start from this checkpoint instead of the demo's stage-2 model")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from nvlm.demo.pipeline import BUDGETS, stage_config
    from nvlm.repro import tasks as rtasks
    from nvlm.repro.rl import evaluate_counts
    from nvlm.training.config import RLConfig
    from nvlm.training.metrics import read_metrics
    from nvlm.training.trainer import Trainer

    demo, out = Path(args.demo), Path(args.out)
    start = Path(args.init) if args.init else demo / f"nvlm-{args.arch.lower()}" / "stage2" / "final"
    if not start.exists():
        print(f"error: no stage-2 model at {start}; run `nvlm demo --quick --arch {args.arch}` first", file=sys.stderr)
        return 2
    data = demo / "data"
    if not (data / "test" / "count_wide.jsonl").exists():
        rtasks.generate_count_ood(data, 100)
    cfg = stage_config(args.arch, "sft", demo, BUDGETS["quick"], init_from=str(start), seed=args.seed)
    batch = args.prompts * (args.group if args.stage == "sft" else 1)
    count = {"path": str(data / "train" / "count.jsonl"), "weight": 1.0, "image_root": str(data)}
    rl = RLConfig(group_size=args.group, max_new_tokens=3, temperature=args.temperature, kl_coef=args.kl,
                  updates_per_rollout=args.updates)  # fmt: skip
    train = dataclasses.replace(cfg.train, stage=args.stage, max_steps=args.steps, global_batch_size=batch,
                                micro_batch_size=batch, lr=args.lr, min_lr=args.lr, warmup_steps=0, log_every=1,
                                rl=rl)  # fmt: skip
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[count]), train=train)
    before_path = start.parent / "counts.json"
    if not before_path.exists():
        before_path.write_text(json.dumps(evaluate_counts(start, data)))
    t0 = time.process_time()
    r = Trainer(cfg, out, progress=False).run()
    cpu_s = time.process_time() - t0
    rows = list(read_metrics(out / "metrics.jsonl"))
    rewards = [row["reward/mean"] for row in rows if "reward/mean" in row]
    k = max(1, len(rewards) // 5)
    result = {
        "stage": args.stage, "arch": args.arch, "steps": args.steps, "lr": args.lr, "group": args.group,
        "temperature": args.temperature, "kl": args.kl, "updates": args.updates, "prompts": args.prompts,
        "seed": args.seed,
        "before": json.loads(before_path.read_text()), "after": evaluate_counts(r.final_dir, data),
        "reward_first": sum(rewards[:k]) / k if rewards else None,
        "reward_last": sum(rewards[-k:]) / k if rewards else None,
        "rollout_s": sum(row.get("rollout_s", 0.0) for row in rows),
        "train_s": sum(row.get("train_s", 0.0) for row in rows),
        "stage_cpu_s": cpu_s,
    }  # fmt: skip
    print(json.dumps(result))
    (out / "rl_count.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
