"""The ``nvlm`` command: ``inspect`` (tiling and token layout), ``demo``, ``train`` (one process or torchrun),
``chat`` (ask a saved model), ``quantize`` (weight-only, torchao), ``convert`` (release layout ↔ ours), ``eval``,
``bench``, ``serve`` (OpenAI-compatible HTTP server), ``merge`` (fold LoRA adapters in).

    nvlm inspect doc.png
    torchrun --nproc_per_node=8 -m nvlm train d-72b-sft --out runs/sft
    nvlm train h-34b-sft --dry-run --world-size 128
    nvlm inspect --size 1000x800 --size 500x400 --json
    nvlm chat --model out/ --image doc.png "What is the total?"
    nvlm convert /weights/NVLM-D-72B out/nvlm-d-72b            (--to release: back to the release layout)

Errors: a user error (bad flag, config, data, image, file) prints ONE line ``error: ...`` naming the input and
the fix, and exits 2; a traceback appears only for real bugs, or for everything with ``nvlm --debug ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from nvlm.errors import UserError
from nvlm.vision.tiling import MAX_TILES_LIMIT  # torch-free: `nvlm --help` stays fast

USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``error: nvlm chat: ... (see nvlm chat --help)``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USER_ERROR)


def _int_in(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {f'between {low} and {high}' if high is not None else f'>= {low}'}, got {value}"
            )
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value

    return parse


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes WIDTHxHEIGHT, e.g. 1000x800; got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"--size needs positive width and height, got {text!r}")
    return w, h


def _one_per_tag(text: str) -> int:
    return 1 if text else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from nvlm.data.layout import describe
    from nvlm.vision.image_io import ImageLoadError, load_image
    from nvlm.vision.tiling import plan_tiles

    count = _one_per_tag  # special-token mode: one token per tag
    tile, per_tile, style, thumb = args.tile_size, args.tokens_per_tile, args.tags, "<tile_global_thumbnail>"
    if args.model:  # take tiling, tags and tokenizer from a saved model
        from nvlm.config import NVLMConfig

        cfg = NVLMConfig.load(f"{args.model}/config.json")
        pre = json.loads(open(f"{args.model}/preprocessor_config.json").read())
        tile, per_tile, style, thumb = pre["tile_size"], pre["tokens_per_tile"], cfg.tags.style, cfg.tags.thumbnail_tag
        args.min_tiles, args.max_tiles = cfg.tiling.min_tiles, cfg.tiling.max_tiles
        args.tokenizer = args.tokenizer or args.model
    if args.tokenizer:
        from nvlm.models.llm import load_tokenizer

        tok = load_tokenizer(args.tokenizer)

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    sources: list[tuple[str, int, int]] = [(f"{w}x{h}", w, h) for w, h in args.size]
    for path in args.images:
        try:
            im = load_image(path)
        except ImageLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sources.append((path, im.width, im.height))
    if not sources:
        print("error: give image files or --size WxH", file=sys.stderr)
        return 2
    report = []
    for name, w, h in sources:
        plan = plan_tiles(w, h, tile, args.min_tiles, args.max_tiles, not args.no_thumbnail)
        report.append({"source": name, **describe(plan, per_tile, style, thumb, count)})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for info in report:
            _print_inspect(info)
    return 0


def _print_inspect(info: dict[str, Any]) -> None:
    cols, rows = info["grid"]
    print(
        f"{info['source']}: {info['width']}×{info['height']} → grid {cols}×{rows} (cols×rows), "
        f"{info['num_tiles']} tiles{' incl. thumbnail' if info['thumbnail'] else ', no thumbnail'}"
    )
    for t in info["tiles"]:
        print(f"  tile {t['index']:>2} {t['kind']:<9} box {tuple(t['box'])}")
    print(f"  {'arch':<4} {'decoder':>8} {'x-attn':>8} {'tag tok (dec/x)':>16}   layout")
    for arch in ("D", "X", "H"):
        tok, tag, lay = info["tokens"][arch], info["tag_tokens"][arch], info["layout"][arch]
        layout = lay["decoder"] + (f"   memory: {lay['xattn']}" if lay["xattn"] else "")
        print(f"  {arch:<4} {tok['decoder']:>8} {tok['xattn']:>8} {tag['decoder']:>7}/{tag['xattn']:<8}   {layout}")


def cmd_chat(args: argparse.Namespace) -> int:
    from dataclasses import replace

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(
            f"--model {args.model}: no saved nvlm model there (no config.json); give a folder written "
            "by save_pretrained, e.g. a run's final/ folder"
        )
    for image in args.image:
        if not os.path.isfile(image):
            raise UserError(f"--image {image}: no such file; check the path")
    from nvlm.inference.memory import Serving, load_checked, resolve
    from nvlm.inference.schemes import parse_keep

    device, dtype = resolve(args.device, args.dtype)
    s = Serving(quantize=args.quantize, keep=parse_keep(args.quantize_keep), dtype=dtype, device=device)
    model, processor = load_checked(args.model, replace(s, max_batch=1, images=max(len(args.image), 1)))
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    for piece in model.chat(processor, args.question, images=args.image, stream=True, **kwargs):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.src, "config.json")):  # said before torch loads
        raise UserError(f"{args.src}: no saved model there (no config.json); give an nvlm checkpoint or the release")
    if os.path.isdir(args.dst) and os.listdir(args.dst):
        raise UserError(f"{args.dst} exists and is not empty; give a new folder")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun the model would load split over the processes
        raise UserError("nvlm quantize writes one whole model: run it as one process, without torchrun")
    from nvlm.inference import quantized_io
    from nvlm.inference.memory import Serving, load_checked, resolve
    from nvlm.inference.quantize import summary
    from nvlm.inference.schemes import parse_keep

    device, dtype = resolve(args.device, args.dtype)
    keep = parse_keep(args.quantize_keep)
    s = Serving(quantize=args.scheme, keep=keep, dtype=dtype, device=device, max_batch=0, images=0)
    model, processor = load_checked(args.src, s)
    quantized_io.save(model, processor, args.dst, args.scheme, keep)
    counts = summary(model)
    print(f"wrote {args.dst}: {counts['quantized']} Linears {args.scheme}, {counts['kept']} kept in {dtype}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nvlm.recipes import RECIPES, check_folders, get_recipe
    from nvlm.training.config import load_run_config, override

    # a ConfigError (bad key, value, YAML) goes to main's one error path: one line, exit 2; the input is checked
    # before the trainer (and torch) is imported, so a mistake is reported at once
    if args.recipe in RECIPES:
        cfg = get_recipe(args.recipe)
    elif Path(args.recipe).is_file():
        cfg = load_run_config(args.recipe)
    else:
        raise UserError(f"{args.recipe!r} is neither a recipe ({', '.join(sorted(RECIPES))}) nor a config file")
    cfg = override(cfg, args.overrides)
    if args.dry_run:
        from nvlm.training.plan import plan, render
        from nvlm.training.plan_time import Hardware

        hw = Hardware(
            peak_tflops=args.gpu_peak_tflops,
            compute_efficiency=args.compute_efficiency,
            nvlink_gbs=args.nvlink_gbs,
            ib_gbs=args.ib_gbs,
            gpus_per_node=args.gpus_per_node,
            memory_gib=args.gpu_memory_gib,
        )
        try:
            report = plan(cfg, args.world_size, hw)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0
    if args.out is None:
        print("error: nvlm train needs --out DIR (the run folder; re-running with it resumes)", file=sys.stderr)
        return 2
    check_folders(cfg, args.recipe)
    from nvlm.data.blend import TooManyBadSamples
    from nvlm.distributed.parallel import init_world, shutdown
    from nvlm.training.trainer import NonFiniteLoss, PeerFailed, Trainer

    # NCCL's flight recorder dumps there when a collective times out (see nvlm.distributed.parallel)
    world = init_world(
        cfg.train.collective_timeout_s, dump_dir=Path(args.out) / "flight_recorder", train_device=cfg.train.device
    )
    try:
        result = Trainer(cfg, args.out, world=world).run()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return NonFiniteLoss.exit_code
    except (TooManyBadSamples, PeerFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    finally:
        shutdown(world)
    if world.main:
        print(f"{'saved and stopped' if result.interrupted else 'finished'} at step {result.steps}: {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.src):  # said before torch loads
        raise UserError(f"{args.src}: no such folder; give a LoRA run's checkpoint (its final/ folder)")
    from nvlm.loading import merge_checkpoint

    merge_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}: a plain nvlm checkpoint, LoRA adapters folded in")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from nvlm.interop.convert import convert

    try:
        size = _bytes(args.max_shard_size)
        out = convert(args.src, args.dst, to=args.to, max_shard_bytes=size, remote_code_from=args.remote_code_from)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({'our format' if args.to == 'ours' else 'the release layout'})")
    return 0


def _bytes(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"--max-shard-size takes a size like 5GB or 500MB, got {text!r}")


def cmd_demo(args: argparse.Namespace) -> int:
    from nvlm.demo.pipeline import run_demo

    run_demo(args.out, arch=args.arch, quick=args.quick, seed=args.seed, threads=args.threads)
    return 0


def _device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


# Long on purpose: one flat table of the `nvlm` command's subcommands and flags, read top to bottom.
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nvlm", description="NVLM 1.0 (D, X, H) in PyTorch")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show how images are tiled and laid out for D, X and H")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--size", action="append", type=_size, default=[], help="an image size WxH instead of a file")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    p.add_argument("--model", help="a saved nvlm model folder: use its tiling, tags and tokenizer")
    p.add_argument("--tokenizer", help="count tag tokens with this tokenizer (default: one token per tag)")
    p.add_argument("--tile-size", type=_int_in(1, 4096), default=448)
    p.add_argument("--tokens-per-tile", type=_int_in(1, 4096), default=256)
    p.add_argument("--min-tiles", type=_int_in(1, MAX_TILES_LIMIT), default=1)
    p.add_argument(
        "--max-tiles",
        type=_int_in(1, MAX_TILES_LIMIT),
        default=6,
        help=f"most regular tiles per image (1..{MAX_TILES_LIMIT}; the paper uses 6)",
    )
    p.add_argument("--no-thumbnail", action="store_true")
    p.add_argument("--tags", default="1d", choices=["none", "1d", "2d_grid", "2d_bbox"])
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="the whole pipeline in miniature on synthetic data (CPU, no downloads)")
    p.add_argument("--quick", action="store_true", help="about 3 minutes instead of about 15")
    p.add_argument("--arch", default="D", choices=["D", "X", "H", "all", "d", "x", "h"])
    p.add_argument("--out", default="runs/demo", help="where data, backbones, checkpoints and results go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=cmd_demo)

    from nvlm.repro.cli import add_repro_parser

    add_repro_parser(sub)

    p = sub.add_parser(
        "train", help="train a recipe or a config file (stage 1 = pretrain, stage 2 = sft, then grpo / dpo)"
    )
    p.add_argument("recipe", help="a recipe name (e.g. tiny-d, d-72b-sft) or a YAML/JSON run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    p.add_argument("--out", help="run folder; re-running with the same folder resumes")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build on the meta device and print parameters, sharding plan and GiB per GPU; no training",
    )
    p.add_argument("--world-size", type=_int_in(1), default=8, help="processes (GPUs) for --dry-run's estimate")
    p.add_argument("--json", action="store_true", help="--dry-run: print JSON")
    # --dry-run's time model (nvlm.training.plan_time); defaults: H100 SXM nodes, one 400 Gb/s NIC per GPU
    p.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="--dry-run: dense bf16 peak per GPU")
    p.add_argument("--compute-efficiency", type=float, default=0.6, help="--dry-run: achievable fraction of peak")
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="--dry-run: NVLink GB/s per GPU and direction")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="--dry-run: inter-node GB/s per GPU and direction")
    p.add_argument("--gpus-per-node", type=_int_in(1), default=8, help="--dry-run: GPUs per node (tp stays inside)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="--dry-run: memory per GPU for the search")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("chat", help="ask a saved model a question about images")
    p.add_argument("question")
    p.add_argument("--model", required=True, help="a folder written by save_pretrained, or the NVLM-D-72B release")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--max-new-tokens", type=_int_in(1), default=128)
    p.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0)
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, help="in (0, 1]")
    _device_arguments(p)
    from nvlm.inference.schemes import SCHEMES, add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("quantize", help="write a model's LLM quantized (torchao, weight-only) for nvlm.load")
    p.add_argument("src", help="an nvlm checkpoint or the NVLM-D-72B release folder")
    p.add_argument("dst", help="a new or empty folder")
    p.add_argument("--scheme", required=True, choices=list(SCHEMES), help="int8, int4 or fp8 (see nvlm chat --help)")
    p.add_argument("--quantize-keep", default=None, metavar="PREFIXES", help="module-name prefixes left unquantized")
    _device_arguments(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert", help="the released NVLM-D-72B layout ↔ our format (streamed, shard by shard)")
    p.add_argument("src", help="a release-layout folder (--to ours) or an nvlm checkpoint (--to release)")
    p.add_argument("dst", help="a new or empty folder")
    p.add_argument(
        "--to",
        default="ours",
        choices=["ours", "release"],
        help="ours: nvlm's format; release: the release's layout, for vLLM and the release's own code",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file written (default 5GB)")
    p.add_argument(
        "--remote-code-from",
        default=None,
        metavar="RELEASE_DIR",
        help="--to release: copy the release's .py files and config keys (auto_map) beside the export, so it loads "
        "with AutoModel.from_pretrained(..., trust_remote_code=True) as the release does",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="fold a LoRA checkpoint's adapters into a plain nvlm checkpoint")
    p.add_argument("src", help="a checkpoint with llm_adapter/ (a LoRA run's final/)")
    p.add_argument("dst", help="the merged checkpoint's folder")
    p.set_defaults(func=cmd_merge)

    from nvlm.bench.cli import add_bench_subcommands
    from nvlm.eval.cli import add_eval_subcommands

    add_bench_subcommands(sub.add_parser("bench", help="training throughput of NVLM-D/X/H at equal shapes (Table 3)"))

    add_eval_subcommands(sub.add_parser("eval", help="score predictions, run benchmarks, report tables"))

    from nvlm.serve.server import add_serve_parser

    add_serve_parser(sub)
    from nvlm.data.cli import add_parser as add_data_parser

    add_data_parser(sub)
    return parser


# Lines third-party code logs on import that nobody running nvlm can act on. transformers imports torchao whenever
# it is installed (the `quant` extra), also without --quantize; torchao 0.18 then reports its CUDA kernels and Triton
# missing on a CPU machine, and registers enums through a torch API that torch 2.13 deprecates (torchao's own call).
IMPORT_NOISE = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.starts)


def quiet_import_noise() -> None:
    for name, lines in IMPORT_NOISE.items():
        logging.getLogger(name).addFilter(_DropLines(lines))


def main(argv: list[str] | None = None) -> int:
    # our progress bars and tables only: no per-load "Loading weights" bars from transformers / huggingface_hub
    # (read when they are first imported, so set before any command imports them; a user's setting wins)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_import_noise()
    import nvlm.demo  # noqa: F401 - registers the demo's tiny-{d,x,h} recipes and its eval scorer

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "train" and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value overrides may also come after --out (one without "=" is refused there)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from nvlm.cli_errors import check_input_files, is_user_error, one_line

    try:
        check_input_files(args)
        return int(args.func(args) or 0)
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        print(f"error: {one_line(e, args)}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
