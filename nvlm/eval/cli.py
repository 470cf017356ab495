"""``nvlm eval`` sub-commands (paper Sec. 6): ``score`` (score a JSONL of predictions, no model needed),
``report`` (Tables 7 and 8) and ``run`` (a model answers a benchmark, ``nvlm.eval.runner``).

The main CLI creates the ``eval`` parser and calls ``add_eval_subcommands(eval_parser)``; every sub-command
sets ``func(args) -> int`` (the exit status). Exit status 2 means bad input, reported as
``FILE:LINE: what is wrong and what field is expected``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nvlm.eval.benchmarks import LAYOUTS, PROMPTS, DataError
from nvlm.eval.report import build_report, render_report
from nvlm.eval.run_folder import RunError
from nvlm.eval.scorers import MODES, SCORERS, SandboxError, ScoringError, score_items

BAD_INPUT = 2


class InputError(ValueError):
    """A problem with an input file, already worded as ``FILE:LINE: message``."""


def add_eval_subcommands(eval_parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Add ``score`` and ``report`` under ``eval_parser``; return the sub-parser group (``run`` goes there too)."""
    sub = eval_parser.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)

    score = sub.add_parser(
        "score",
        help="score a JSONL file of predictions against the official scorer (no model needed)",
        description="Score TASK predictions: FILE is JSONL, one item a line, "
        '{"prediction": str, "answers": [str, ...], <task fields>} (see nvlm/eval/README.md).',
    )
    score.add_argument("task", choices=list(SCORERS), help="benchmark")
    score.add_argument("file", help="JSONL file of predictions")
    score.add_argument("--mode", choices=MODES, default="official", help="official scorer, or NVIDIA's Megatron one")
    score.add_argument("--json", action="store_true", help='print {"score", "items": [...], ...} as JSON')
    score.add_argument("--timeout", type=float, default=None, help="humaneval: seconds per program (default 10)")
    score.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="humaneval: run model-written code without OS isolation where bubblewrap is missing (exposes this host)",
    )
    score.set_defaults(func=run_score)

    report = sub.add_parser("report", help="print a run folder in the layout of the paper's Tables 7 and 8")
    report.add_argument("folder", help="run folder with one sub-folder per task holding summary.json")
    report.add_argument("--backbone", default=None, help="the backbone LLM's run folder (Text-only Avg. 4)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(func=run_report)

    add_run_subcommand(sub)
    return sub


def add_run_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a saved model on a benchmark: predictions (resumable), then the official score",
        description="Answer a benchmark with a saved model and score it. TASK's --data: "
        + "; ".join(f"{t}: {layout}" for t, layout in LAYOUTS.items())
        + ". See nvlm/eval/README.md.",
    )
    p.add_argument("--model", default=None, help="a folder written by save_pretrained (or give --server)")
    p.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="instead of --model: any OpenAI-compatible server (nvlm serve, vLLM, SGLang), e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument("--server-model", default=None, help="--server: the model name to ask for (default: its first)")
    p.add_argument(
        "--api-key-file", default=None, help="--server: a file holding the API key (default: $OPENAI_API_KEY)"
    )
    p.add_argument("--task", required=True, choices=list(PROMPTS), help="benchmark")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="the benchmark's local files: a file, several shards, or the dataset's folder (see nvlm/eval/README.md)",
    )
    p.add_argument("--out", default="evals", help="run folder; writes OUT/TASK/{predictions.jsonl,summary.json}")
    p.add_argument(
        "--restart",
        action="store_true",
        help="forget OUT/TASK's earlier predictions (needed to reuse a folder for other data or settings)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=MODES, default="official", help="official scorer, or NVIDIA's Megatron one")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (see README)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    from nvlm.inference.schemes import add_arguments

    add_arguments(p)
    p.set_defaults(func=run_command)


def _server_model(args: argparse.Namespace) -> Any:
    """An OpenAI-compatible server as the model: the pinned prompts go out as chat requests, our scorers score."""
    import os

    from nvlm.serve.client import ServerModel

    key = os.environ.get("OPENAI_API_KEY")
    if args.api_key_file:
        with open(args.api_key_file) as f:
            key = f.read().strip()
    return ServerModel(args.server, args.server_model, key)


def run_command(args: argparse.Namespace) -> int:
    from nvlm.eval.runner import run_benchmark  # imports torch only when a run is asked for
    from nvlm.inference.schemes import parse_keep

    if (args.model is None) == (args.server is None):
        print("error: give --model FOLDER or --server URL (one of them)", file=sys.stderr)
        return BAD_INPUT
    try:
        result = run_benchmark(
            _server_model(args) if args.server else args.model,
            args.task,
            args.data,
            args.out,
            args.limit,
            args.batch_size,
            args.mode,
            args.max_new_tokens,
            device=args.device,
            dtype=args.dtype,
            restart=args.restart,
            quantize=args.quantize,
            quantize_keep=parse_keep(args.quantize_keep),
        )
    except (DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_result({k: v for k, v in result.items() if k not in ("predictions", "summary", "generated", "reused")})
    print(f"  generated: {result['generated']}, reused from an earlier run: {result['reused']}")
    print(f"  predictions: {result['predictions']}\n  summary: {result['summary']}")
    return 0


def read_jsonl(path: str | Path) -> tuple[list[Any], list[int]]:
    """Items and their 1-based line numbers (blank lines skipped). InputError on unreadable lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the file ({exc})") from None
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(item, dict):
            raise InputError(
                f'{path}:{number}: expected a JSON object like {{"prediction": "...", "answers": ["..."]}}, '
                f"got {type(item).__name__}"
            )
        items.append(item)
        lines.append(number)
    if not items:
        raise InputError(f"{path}: no items (expected one JSON object a line)")
    return items, lines


def score_file(task: str, path: str | Path, mode: str = "official", **options: Any) -> dict:
    """Score a JSONL file; InputError naming ``FILE:LINE`` when an item cannot be scored."""
    items, lines = read_jsonl(path)
    try:
        return score_items(task, items, mode, **options)
    except ScoringError as exc:
        where = f"{path}:{lines[exc.index]}" if exc.index is not None else str(path)
        raise InputError(f"{where}: {exc.message}") from None


def _print_result(result: dict) -> None:
    print(f"{result['task']} ({result['mode']} mode): {_fmt(result['score'])}  [{result.get('metric', '')}]")
    print(f"  items: {result['n']}")
    for key, value in result.items():
        if key in ("task", "mode", "score", "n", "items", "metric", "scale", "results"):
            continue
        if isinstance(value, dict):
            print(f"  {key}:")
            for name, sub in value.items():
                if isinstance(sub, dict):
                    detail = ", ".join(f"{k}={_fmt(v)}" for k, v in sub.items())
                    print(f"    {name}: {detail}")
                else:
                    print(f"    {name}: {_fmt(sub)}")
        else:
            print(f"  {key}: {_fmt(value)}")


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def run_score(args: argparse.Namespace) -> int:
    options = {}
    if args.timeout is not None:
        if args.task != "humaneval":
            print("--timeout applies to humaneval only", file=sys.stderr)
            return BAD_INPUT
        options["timeout"] = args.timeout
    if args.unsafe_exec:
        if args.task != "humaneval":
            print("--unsafe-exec applies to humaneval only", file=sys.stderr)
            return BAD_INPUT
        options["unsafe_exec"] = True
    try:
        result = score_file(args.task, args.file, args.mode, **options)
    except InputError as exc:
        print(str(exc), file=sys.stderr)
        return BAD_INPUT
    except SandboxError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        _print_result(result)
    return 0


def run_report(args: argparse.Namespace) -> int:
    try:
        report = build_report(args.folder, args.backbone)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return BAD_INPUT
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0
