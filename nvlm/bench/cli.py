"""``nvlm bench`` sub-commands: ``train`` (the paper's Table 3 — D/X/H training throughput at equal shapes),
``serve`` (a load generator for an OpenAI-compatible server, ``nvlm.bench.serve``) and ``structured`` (structured
outputs' cost per token, ``nvlm.bench.structured``).

The main CLI creates the ``bench`` parser and calls ``add_bench_subcommands(bench_parser)``; every sub-command
sets ``func(args) -> int`` (the exit status; 2 = bad arguments, with a message naming the flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

BAD_INPUT = 2
ARCHS = ("D", "X", "H")
PRESETS = ("cpu", "gpu-1b")


# Long on purpose: one flat table of `nvlm bench`'s subcommands and flags, read top to bottom.
def add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add ``train`` under `parser` (the ``bench`` parser)."""
    sub = parser.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "train",
        help="training throughput of NVLM-D/X/H at equal shapes (paper Table 3)",
        description="Build NVLM-D, -X and -H from the same random backbones, time full training steps "
        "(forward, backward, AdamW) interleaved in one process, and print samples/s, tokens, analytic FLOPs, "
        "MFU, peak memory and the X/D, H/D ratios next to the paper's 1.76 and 1.26.",
    )
    p.add_argument("--arch", default="D,X,H", help="comma-separated subset of D,X,H (default D,X,H)")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="shapes: cpu (tiny, seconds on 2 cores) or gpu-1b (~1.5B LLM + 300M ViT, bf16); "
        "default gpu-1b on CUDA, else cpu",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cuda when available")
    p.add_argument(
        "--stage",
        choices=("sft", "pretrain"),
        default="sft",
        help="sft: LLM trained (default); pretrain: LLM frozen, on the gradient path",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per arch (interleaved)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per arch")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step")
    p.add_argument("--tiles", type=int, default=None, help="regular tiles per image (a thumbnail is added)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens per sample (question + answer)")
    p.add_argument(
        "--xattn-every", type=int, default=None, help="X/H: a cross-attention block before every N-th LLM layer"
    )
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default=None, help="bf16 = autocast with fp32 weights (default on CUDA)"
    )
    p.add_argument(
        "--park",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep only the arch being timed on the GPU (default: on for CUDA)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build on the meta device and report tokens and analytic FLOPs only, no timing",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _vs_flags(p)
    p.add_argument(
        "--compile",
        choices=("none", "ours", "both"),
        default="none",
        help="with --vs hf: torch.compile our decoder layers, x-attn blocks, vision layers and projector as "
        "train.compile does (ours), or also the reference's counterparts (both); default none (all eager)",
    )
    p.set_defaults(func=run_train)

    g = sub.add_parser(
        "generate",
        help="greedy decoding speed against transformers' InternVL (D) and Mllama (X)",
        description="Build our NVLM-D/X and transformers' InternVL/Mllama at equal shapes (D: the same weights), "
        "decode the same image question greedily for a fixed number of tokens, interleaved in one process, "
        "and print tokens/s and the ratios. CPU shapes (the cpu preset).",
    )
    g.add_argument("--arch", default="D,X", help="comma-separated subset of D,X (default D,X)")
    g.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes (default 1,4)")
    g.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample (default 64)")
    g.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (default 5)")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls of each first (default 1)")
    g.add_argument("--tiles", type=int, default=None, help="regular tiles per image (a thumbnail is added)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _vs_flags(g)
    g.set_defaults(func=run_generate)

    k = sub.add_parser(
        "packing",
        help="SFT steps on long-tailed lengths: padded vs packed, real tokens/s",
        description="Time NVLM-D training steps (cpu preset) on one micro-batch of long-tailed text samples, "
        "padded to the longest vs packed into rows, interleaved in one process; print real tokens/s and the ratio.",
    )
    k.add_argument("--samples", type=int, default=16, help="samples in the micro-batch (default 16)")
    k.add_argument("--max-len", type=int, default=512, help="longest sample and packed row length (default 512)")
    k.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (default 5)")
    k.add_argument("--warmup", type=int, default=1, help="untimed steps of each first (default 1)")
    k.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--json", action="store_true", help="print the results as one JSON object")
    k.set_defaults(func=run_packing)

    from nvlm.bench.serve import add_bench_serve_parser
    from nvlm.bench.structured import add_bench_structured_parser

    add_bench_serve_parser(sub)
    add_bench_structured_parser(sub)


def _vs_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vs",
        choices=("hf",),
        default=None,
        help="hf: race our D and X against transformers' InternVL and Mllama at equal shapes (ratios ours/theirs)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="LLM vocabulary (default: the tiny tokenizer's; Qwen2: 151936)"
    )


def parse_archs(text: str) -> list[str]:
    """``"D,X,H"`` → ["D", "X", "H"] (case-insensitive); ValueError naming --arch and the allowed values."""
    archs = [a.strip().upper() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs or len(set(archs)) != len(archs):
        why = f"unknown architecture(s) {bad}" if bad else "empty or repeated architectures"
        raise ValueError(
            f"--arch {text!r}: {why}; allowed values: {', '.join(ARCHS)} (comma-separated, e.g. --arch D,X,H)"
        )
    return archs


def run_train(args: argparse.Namespace) -> int:
    try:
        archs = parse_archs(args.arch)
    except ValueError as exc:
        print(f"nvlm bench train: {exc}", file=sys.stderr)
        return BAD_INPUT
    for flag in ("steps", "batch_size", "tiles", "text_tokens", "xattn_every", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"nvlm bench train: --{flag.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return BAD_INPUT
    if args.warmup is not None and args.warmup < 0:
        print(f"nvlm bench train: --warmup must be >= 0, got {args.warmup}", file=sys.stderr)
        return BAD_INPUT

    if args.vs is not None:
        return run_vs_hf(args, archs)
    if args.compile != "none":
        print("nvlm bench train: --compile compares against the reference: add --vs hf", file=sys.stderr)
        return BAD_INPUT

    import torch

    from nvlm.bench.train import render, resolve_shape, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("nvlm bench train: --device cuda, but no CUDA device is available", file=sys.stderr)
        return BAD_INPUT
    torch.set_num_threads(args.threads)
    preset = args.preset or ("gpu-1b" if device == "cuda" else "cpu")
    shape = resolve_shape(
        preset,
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        tiles=args.tiles,
        text_tokens=args.text_tokens,
        xattn_every=args.xattn_every,
        dtype=args.dtype or ("bf16" if device == "cuda" else None),
    )
    if args.vocab_size is not None:
        shape = replace(shape, llm={**shape.llm, "vocab_size": args.vocab_size})
    result = run(archs, shape, device=device, stage=args.stage, seed=args.seed, park=args.park, dry_run=args.dry_run)
    result["settings"]["preset"] = preset
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def run_vs_hf(args: argparse.Namespace, archs: list[str]) -> int:
    """``nvlm bench train --vs hf`` (CPU, the cpu preset's shapes): D vs InternVL, X vs Mllama."""
    import torch

    from nvlm.bench import vs_hf
    from nvlm.bench.train import resolve_shape

    archs = [a for a in archs if args.arch != "D,X,H" or a != "H"]  # the default list: H has no reference
    if "H" in archs or (args.device or "cpu") != "cpu" or (args.preset or "cpu") != "cpu":
        print("nvlm bench train --vs hf: compares NVLM-D and NVLM-X on the cpu preset (--arch D,X)", file=sys.stderr)
        return BAD_INPUT
    torch.set_num_threads(args.threads)
    shape = resolve_shape(
        "cpu", steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, tiles=args.tiles,
        text_tokens=args.text_tokens, xattn_every=args.xattn_every,
    )  # fmt: skip
    if args.vocab_size is not None:
        shape = replace(shape, llm={**shape.llm, "vocab_size": args.vocab_size})
    result = vs_hf.bench_train(archs, shape, args.seed, args.compile)
    print(json.dumps(result, indent=2) if args.json else vs_hf.render(result))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    try:
        archs = parse_archs(args.arch)
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError as exc:
        print(f"nvlm bench generate: {exc}", file=sys.stderr)
        return BAD_INPUT
    if "H" in archs or args.vs is None:
        print(
            "nvlm bench generate: give --vs hf and --arch from D,X (H has no transformers reference)", file=sys.stderr
        )
        return BAD_INPUT
    if not sizes or min(sizes) < 1 or args.new_tokens < 1 or args.rounds < 1 or args.warmup < 0:
        print("nvlm bench generate: --batch-sizes, --new-tokens and --rounds must be >= 1", file=sys.stderr)
        return BAD_INPUT
    import torch

    from nvlm.bench import vs_hf
    from nvlm.bench.train import resolve_shape

    torch.set_num_threads(args.threads)
    shape = resolve_shape("cpu", steps=args.rounds, warmup=args.warmup, tiles=args.tiles)
    if args.vocab_size is not None:
        shape = replace(shape, llm={**shape.llm, "vocab_size": args.vocab_size})
    result = vs_hf.bench_generate(archs, shape, sizes, args.new_tokens, args.seed)
    print(json.dumps(result, indent=2) if args.json else vs_hf.render(result))
    return 0


def run_packing(args: argparse.Namespace) -> int:
    if min(args.samples, args.rounds, args.threads) < 1 or args.warmup < 0 or args.max_len < 32:
        print(
            "nvlm bench packing: --samples, --rounds, --threads >= 1, --warmup >= 0, --max-len >= 32", file=sys.stderr
        )
        return BAD_INPUT
    import torch

    from nvlm.bench import packing
    from nvlm.bench.train import resolve_shape

    torch.set_num_threads(args.threads)
    shape = resolve_shape("cpu", steps=args.rounds, warmup=args.warmup)
    shape = replace(shape, llm={**shape.llm, "max_position_embeddings": max(4096, args.max_len)})
    result = packing.bench_packing(shape, args.samples, args.max_len, args.seed)
    print(json.dumps(result, indent=2) if args.json else packing.render(result))
    return 0
