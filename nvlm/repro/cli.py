"""``nvlm repro {tags,speed,pretrain-data,text-sft,freeze-llm,resampler,all}``: re-run one (or all six) of the
paper's design findings at laptop scale and write ``results.json``, a PNG per claim and ``REPORT.md`` under
``--out``. ``nvlm repro rl-vs-sft`` (GRPO vs more SFT after the paper's SFT) runs only when named."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlm.errors import UserError
from nvlm.repro.claims import EXTRA, NAMES, claim

if TYPE_CHECKING:
    from nvlm.repro.run import Scale

HEADER = """# nvlm repro: NVLM 1.0's design findings at laptop scale

Each claim is re-run on synthetic tasks with tiny backbones through the demo's two-stage recipe (stage 1:
LLM frozen; stage 2: SFT), with several training seeds per arm; the verdicts below are computed from the
per-seed numbers by `nvlm.repro.stats` (rule under the table), never written by hand."""


def add_repro_parser(sub: Any) -> None:
    p = sub.add_parser("repro", help="re-run the paper's six design findings at small scale, with a report")
    p.add_argument(
        "claim",
        choices=[*NAMES, *EXTRA, "all"],
        help="which finding (all: the paper's six, then REPORT.md; rl-vs-sft, beyond the paper, only by name)",
    )
    p.add_argument(
        "--arch",
        default="D",
        choices=["D", "X", "d", "x"],
        help="tags: NVLM-D (Table 1) or -X (Table 2); all runs both",
    )
    p.add_argument(
        "--seeds", type=int, default=5, help="training seeds per arm (default 5: the verdict's interval needs them)"
    )
    p.add_argument("--out", default="runs/repro", help="output folder (--quick writes under OUT/quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, tiny budgets")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", help="speed claim: cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override for every arm, e.g. train.max_steps=2000 or model.overrides.xattn.every=2",
    )
    p.set_defaults(func=cmd_repro)


def cmd_repro(args: argparse.Namespace) -> int:
    import torch

    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    from nvlm.repro.run import SCALES

    if args.claim == "all":  # both tag tables (NVLM-D: Table 1, NVLM-X: Table 2), then the other four claims
        runs = [("tags", "D"), ("tags", "X")] + [(n, "D") for n in NAMES if n != "tags"]
    else:
        runs = [(args.claim, args.arch.upper())]
    names = [n for n, _ in runs]
    if "resampler" in names:
        require_resampler()  # before hours of other claims, not after
    seeds = 2 if args.quick else args.seeds  # two: the least a verdict can be computed from
    out = Path(args.out) / ("quick" if args.quick else "")
    scale = SCALES["quick" if args.quick else "default"]
    from nvlm.repro.run import Interrupted

    try:
        for name, arch in runs:
            run_claim(name, out, arch, seeds, scale, args.set, args.device)
    except Interrupted as e:
        print(f"nvlm repro: {e}", file=sys.stderr)
        return 130  # the shell's code for a run stopped by a signal
    print(f"report: {out / 'REPORT.md'}; data: {out / 'results.json'}")
    return 0


def run_claim(
    name: str, out: Path, arch: str, seeds: int, scale: Scale, sets: list[str], device: str | None, log=print
) -> dict[str, Any]:
    """All arms × seeds of one claim (finished ones are read back), then its summary, plot and report section."""
    from tqdm import tqdm

    from nvlm.repro import plots, report
    from nvlm.repro.rl import run_rl_arm
    from nvlm.repro.run import prepare, run_arm, run_speed

    c = claim(name, arch)
    if name == "resampler":
        require_resampler()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    if name == "speed":
        for seed in tqdm(range(seeds), desc=f"{c.name}: D/X/H timing", unit="seed"):
            runs.append(run_speed(out, scale, c, seed, device))
    else:
        info = prepare(out, scale, log)
        for arm in c.arms:  # one progress line per arm
            for seed in tqdm(range(seeds), desc=f"{c.name}: {arm.name}", unit="seed"):
                if arm.after_sft:
                    runs.append(run_rl_arm(out, scale, c, arm, seed, sets))
                else:
                    runs.append(run_arm(out, scale, c, arm, seed, sets, info["text_backbone_accuracy"]))
    summary = report.summarise(c, runs)
    png = out / f"{c.name}.png"
    drawn = plots.claim_figure(summary, png, curves=name == "resampler")
    if not drawn:
        log(plots.INSTALL)
    report.write(out, {c.name: summary}, {c.name: report.section(summary, c, png.name if drawn else None)}, HEADER)
    log(f"{c.title}: {summary['verdict']} ({time.perf_counter() - t0:.0f} s) → {out / 'REPORT.md'}")
    return summary


def require_resampler() -> None:
    from nvlm.config import NVLMConfig

    if "resampler" not in NVLMConfig.__dataclass_fields__:
        raise UserError(
            "the resampler claim needs the model option `resampler.latents` (the Perceiver resampler), "
            "which this version of nvlm does not have yet"
        )
