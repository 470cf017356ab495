"""``nvlm data``: look at training data the way the trainer reads it, and time the loader alone.

    nvlm data inspect PATH [PATH …]          kind, layout, files, records, one sample with its tiles and tokens
    nvlm data index PATH [PATH …]            build the sources' indexes now (a run then starts at once)
    nvlm data bench PATH [PATH …] --workers N   loader-only samples/s: read, decode, tile, tokenize
    nvlm data pack SOURCE OUT [--shard-size 1GB]  WebDataset shards + Energon .nv-meta (``nvlm.data.pack``)

A path may be an Energon Metadataset blend (a .yaml, or ``blend:nvlm-sft`` / ``blend:nvlm-pretrain``, shipped,
their datasets under ``--data-root`` or ``$NVLM_DATA_ROOT``): ``inspect`` then lists its datasets, which are
there, their records and their share of the blend, before it inspects those present.

(``python -m nvlm.data.cli COMMAND …`` runs the same commands.)

Without ``--model`` samples are encoded with the paper's shapes (448-pixel tiles, 256 tokens a tile, at most 6
tiles + thumbnail) and nvlm's small test tokenizer, so text token counts are indicative only; ``--model`` takes
tiling, tags and tokenizer from a saved nvlm model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from types import SimpleNamespace
from typing import Any

from nvlm.data.blend import SampleStream
from nvlm.data.formats import BadRecord, chatml_segments
from nvlm.data.sources import kind_of, open_mixture, open_sources
from nvlm.data.sources.metadataset import ROOT_ENV, leaves
from nvlm.errors import UserError


def add_parser(subparsers: Any) -> None:
    """Register ``nvlm data`` under the top-level parser's subparsers."""
    parser = subparsers.add_parser("data", help="inspect, index and benchmark training data sources")
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    for name, text in (
        ("inspect", "layout, counts and one sample (tiles, tokens) of each source"),
        ("index", "build the sources' indexes now, so that training starts at once"),
        ("bench", "loader-only samples/s (read, decode, tile, tokenize), with N worker processes"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("paths", nargs="+", help="sources: .jsonl, Parquet, WebDataset shards, InternVL meta-JSON")
        p.add_argument("--data-root", help=f"where a shipped blend's datasets are (default: ${ROOT_ENV})")
        if name != "index":
            p.add_argument("--model", help="a saved nvlm model folder: its tiling, tags and tokenizer")
            p.add_argument("--tile-size", type=int, default=448)
            p.add_argument("--tokens-per-tile", type=int, default=256)
            p.add_argument("--max-tiles", type=int, default=6)
            p.add_argument("--max-seq-len", type=int, default=8192)
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "inspect":
            p.add_argument("--sample", type=int, default=0, help="which record of each source to show")
        if name == "bench":
            p.add_argument("--workers", type=int, default=0, help="data worker processes (data.workers)")
            p.add_argument("--samples", type=int, default=256, help="samples to time (after one warm-up batch)")
            p.add_argument("--batch", type=int, default=16, help="samples per batch() call")
        p.set_defaults(func=main)
    p = sub.add_parser("pack", help="write a source as WebDataset tar shards (one seek a sample when training)")
    p.add_argument("source", help="any source nvlm reads (JSONL, Parquet, shards, InternVL meta-JSON entries)")
    p.add_argument("out", help="a new or empty folder for the shards")
    p.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 1GB, 500MB (default 1GB)")
    p.add_argument("--data-root", help=f"where a shipped blend's datasets are (default: ${ROOT_ENV})")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "data_root", None):
        os.environ[ROOT_ENV] = args.data_root  # read where blend paths resolve, here and in data workers
    return {"inspect": inspect, "index": index, "bench": bench, "pack": pack}[args.data_command](args)


def pack(args: argparse.Namespace) -> int:
    from nvlm.data.pack import pack as write_shards
    from nvlm.data.pack import parse_size

    size = parse_size(args.shard_size)
    for k, source in enumerate(open_sources(args.source)):
        out = args.out if k == 0 else f"{args.out}-{source.name.replace('/', '-')}"
        done = write_shards(source.records, out, size)
        for message in done.skipped[:10]:
            print(f"  skipped: {message}")
        if len(done.skipped) > 10:
            print(f"  … {len(done.skipped) - 10} more skipped")
        if done.shards and not done.energon_index:
            print(
                f"  {out}/.nv-meta: no Energon index (megatron-energon is not installed): for Energon's own loader, "
                f"pip install 'nvlm[energon]' and pack again, or run `energon prepare {out} --tar-index-only`"
            )
        how = f", indexed by megatron-energon {done.energon_index}" if done.energon_index else ""
        print(f"{source.name}: {done.samples:,} samples in {len(done.shards)} shard(s){how}: {out}")
    return 0


def processor(args: argparse.Namespace) -> Any:
    """The processor samples are encoded with: a saved model's, or the paper's shapes with a test tokenizer."""
    from nvlm.config import NVLMConfig, TilingConfig, VisionConfig
    from nvlm.data.processor import Processor, add_nvlm_tokens

    if args.model:
        return Processor.from_pretrained(args.model)
    from nvlm.testing.tiny import tiny_tokenizer

    # a vision config with the asked tile size and tokens per tile: (size / patch / 2)² tokens after pixel shuffle
    patch = max(1, round(args.tile_size / (2 * args.tokens_per_tile**0.5)))
    vision = VisionConfig(type="internvl", hf_config={"image_size": args.tile_size, "patch_size": patch})
    cfg = NVLMConfig(vision=vision, tiling=TilingConfig(max_tiles=args.max_tiles))
    tok = tiny_tokenizer()
    add_nvlm_tokens(tok, cfg)
    return Processor(tok, cfg)


def _spec(path: str) -> Any:
    return SimpleNamespace(path=path, name=None, weight=1.0, image_root=None)


def blend_table(path: str) -> list[dict[str, Any]]:
    """A blend's datasets: path, weight or repetitions, and for those present their records and blend share."""
    rows = []
    for leaf in leaves(path):
        row: dict[str, Any] = {"dataset": leaf.name, ("repetitions" if leaf.epochized else "share"): leaf.share}
        try:
            opened = open_sources(leaf.path, leaf.name, split=leaf.split)
            row["records"] = sum(len(s.records) for s in opened)
        except UserError as e:
            row["missing"] = str(e).split(";")[0]
        rows.append(row)
    present = [r for r in rows if "records" in r]
    sizes = [r["records"] * r.get("repetitions", 1) if "repetitions" in r else r["share"] for r in present]
    for r, size in zip(present, sizes):
        r["blend_share"] = round(size / (sum(sizes) or 1), 4)
    return rows


def inspect(args: argparse.Namespace) -> int:
    proc = processor(args)
    report = []
    for path in args.paths:
        if kind_of(path) == "metadataset":
            rows = blend_table(path)
            print(json.dumps(rows, indent=2) if args.json else _blend_text(path, rows))
            paths = [leaf.path for leaf, row in zip(leaves(path), rows) if "records" in row]
            report += _inspect_sources(paths, args, proc)
            continue
        report += _inspect_sources([path], args, proc)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for info in report:
        sample = info.pop("sample")
        head = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("source", "columns", "path"))
        print(f"{info['source']}: {head}")
        if "columns" in info:
            print(f"  columns: {', '.join(info['columns'])}")
        for key, value in sample.items():
            print(f"  {key}: {value}")
    return 0


def _blend_text(path: str, rows: list[dict[str, Any]]) -> str:
    there = sum("records" in r for r in rows)
    lines = [f"{path}: a blend of {len(rows)} datasets, {there} present"]
    for r in rows:
        weight = f"x{r['repetitions']:g}" if "repetitions" in r else f"weight {r['share']:.3g}"
        state = f"{r['records']:,} records, {100 * r['blend_share']:.2f}% of the blend" if "records" in r else "missing"
        lines.append(f"  {r['dataset']}  {weight}  {state}")
    return "\n".join(lines)


def _inspect_sources(paths: list[str], args: argparse.Namespace, proc: Any) -> list[dict[str, Any]]:
    report = []
    for path in paths:
        for source in open_sources(path):
            info: dict[str, Any] = {"source": source.name, "kind": kind_of(path), "weight": source.weight}
            describe = getattr(source.records, "describe", None)
            info.update(describe() if describe else {"records": len(source.records)})
            if source.max_tiles:
                info["max_tiles"] = source.max_tiles
            info["sample"] = _sample(source, min(args.sample, len(source.records) - 1), proc, args.max_seq_len)
            report.append(info)
    return report


def _sample(source: Any, i: int, proc: Any, max_len: int) -> dict[str, Any]:
    from nvlm.data.budget import encode_within

    try:
        conv = source.records[i]
    except BadRecord as e:
        return {"record": i, "error": str(e)}
    out: dict[str, Any] = {"record": i, "from": conv.source}
    for m in conv.messages:
        text = m["content"].replace("\n", "\\n")
        out.setdefault("turns", []).append(f"{m['role']}: {text[:160]}{'…' if len(text) > 160 else ''}")
    try:
        enc, tiles = encode_within(proc, chatml_segments(conv), conv.images, max_len, source.max_tiles)
    except ValueError as e:
        out["error"] = str(e)
        return out
    out["images"] = [f"{p.width}x{p.height} → {p.num_tiles} tile(s) ({p.grid[0]}x{p.grid[1]})" for p in enc.plans]
    out["tokens"] = len(enc.input_ids)
    out["image_tokens"] = sum(p.num_tiles for p in enc.plans) * proc.tokens_per_tile
    out["trained_tokens"] = sum(t != -100 for t in enc.labels)
    if conv.images and tiles < min(proc.config.tiling.max_tiles, source.max_tiles or 1000):
        out["degraded_to_tiles"] = tiles  # too long at the full budget (data.max_seq_len / --max-seq-len)
    return out


def index(args: argparse.Namespace) -> int:
    for path in args.paths:
        start = time.perf_counter()
        sources = open_sources(path)
        took = time.perf_counter() - start
        records = sum(len(s.records) for s in sources)
        print(f"{path}: {kind_of(path)}, {records:,} records indexed in {took:.2f} s")
    return 0


def memory_mib() -> dict[str, float]:
    """This process's resident memory now (Linux /proc): all of it ("rss") and the part not backed by files
    ("anon": what it allocated, as opposed to mapped index files and libraries the page cache can drop)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out["rss" if key == "VmRSS" else "anon"] = int(value.split()[0]) / 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"rss": peak, "anon": peak}
    return out


def bench(args: argparse.Namespace) -> int:
    proc = processor(args)
    start = time.perf_counter()
    stream = SampleStream(
        open_mixture([_spec(p) for p in args.paths]), proc, args.max_seq_len, workers=args.workers, read_timeout=None
    )
    try:
        stream.batch(args.batch)  # start-up: indexes opened, workers spawned
        startup = time.perf_counter() - start
        done, begin = 0, time.perf_counter()
        while done < args.samples:
            done += len(stream.batch(min(args.batch, args.samples - done)))
        took = time.perf_counter() - begin
    finally:
        stream.close()
    result = {
        "paths": args.paths,
        "workers": args.workers,
        "samples": done,
        "samples_per_s": round(done / took, 1),
        "startup_s": round(startup, 2),
        "rss_mib": round(memory_mib()["rss"], 1),
        "counts": dict(stream.counts),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{done} samples in {took:.2f} s: {done / took:.1f} samples/s with {args.workers} worker(s); "
            f"start-up {startup:.2f} s; main process RSS {result['rss_mib']} MiB; counts {result['counts']}"
        )
    return 0


if __name__ == "__main__":
    import sys

    from nvlm.cli_errors import USER_ERRORS

    top = argparse.ArgumentParser(prog="python -m nvlm.data.cli")
    add_parser(top.add_subparsers(dest="command", required=True))
    parsed = top.parse_args(["data", *sys.argv[1:]])
    try:
        sys.exit(parsed.func(parsed))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
