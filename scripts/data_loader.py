"""Data loader measurements: memory and start-up against data set size, and throughput per storage format.

    python scripts/data_loader.py scale [--sizes 10000,100000,1000000] [--kinds jsonl,wds,parquet] [--legacy]
    python scripts/data_loader.py formats [--samples 300] [--workers 0,2]
    python scripts/data_loader.py demo [--per-task 300] [--samples 1024] [--steps 40]

``scale`` writes tiny records (an 8×8 PNG and a one-turn conversation) at each size under --out (default
/tmp/nvlm-data-bench), builds each source's index in a process of its own (timed), then starts a fresh process
per (kind, size) that opens the source as a run does and reads samples through ``SampleStream``: start-up is
the time from opening the source to the first batch of 16; RSS is the process's resident memory before
opening, after the first batch and after 2,000 samples, in all and the part not backed by files (mapped
index pages are file-backed: shared by the processes of a node, dropped by the kernel under pressure).
``--legacy`` adds the JSONL path that holds every record in memory (``Blend`` over ``read_records``), for
comparison. The demo's shapes (32-pixel tiles, 4 tokens a tile) keep encoding cheap: what is measured is the
data pipeline.

``formats`` writes the same samples (640×480 JPEGs, one question and answer each) as JSONL + loose image
files, as WebDataset shards and as LLaVA-OneVision-style Parquet, then times (1) reading records with their
image bytes in epoch order (the storage alone) and (2) ``nvlm data bench`` with 0 and 2 workers at the paper's
shapes (448-pixel tiles, up to 6 + thumbnail). Figures are this machine's; rerun to compare.

``demo`` writes the demo's data (``nvlm.demo.synthetic``: 32-96 × 32-64 px PNGs, 32-pixel tiles of 4 tokens,
sequences of 160), times ``nvlm data bench`` with 0, 2 and 4 workers on its vision tasks' records as JSONL +
loose PNG files and as the same records packed by ``nvlm data pack`` into WebDataset shards, then trains the
demo's stage 2 (NVLM-D, batch 32, stand-in backbones) with ``data.workers=2`` and reports how long each step
waited on the loader (``data_wait_s`` in metrics.jsonl) against the step's own time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Image = Callable[[int], bytes]  # record index → its image file's bytes


def png_bytes(seed: int, size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> bytes:
    from PIL import Image

    im = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    if size[0] > 8:  # some structure, so JPEG sizes are realistic
        from PIL import ImageDraw

        d = ImageDraw.Draw(im)
        for k in range(12):
            x, y = (seed * 31 + k * 97) % size[0], (seed * 17 + k * 53) % size[1]
            d.rectangle([x, y, x + size[0] // 5, y + size[1] // 5], fill=((k * 40) % 256, (seed + k) % 256, 90))
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=90) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


def turns(i: int) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": f"color {i % 97}"}]


def write_jsonl(folder: Path, n: int, image: Image, distinct: int) -> str:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(min(n, distinct)):
        (folder / f"img/{k}.img").write_bytes(image(k))
    with open(folder / "data.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": f"img/{i % distinct}.img", "conversations": turns(i)}) + "\n")
    return str(folder / "data.jsonl")


def write_wds(folder: Path, n: int, image: Image, ext: str, per_shard: int = 10_000) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-n // per_shard)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                conv = json.dumps({"conversations": turns(i)}).encode()
                for name, data in ((f"{i:09d}.{ext}", image(i)), (f"{i:09d}.json", conv)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def write_parquet(folder: Path, n: int, image: Image, per_file: int = 100_000) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, n, per_file)):
        ids = range(start, min(n, start + per_file))
        table = pa.table(
            {
                "id": [str(i) for i in ids],
                "image": [{"bytes": image(i), "path": None} for i in ids],
                "conversations": [turns(i) for i in ids],
            }
        )
        pq.write_table(table, folder / f"train-{f:05d}.parquet", row_group_size=100)  # HF's size for images
    return str(folder)


def run(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, time, sys
from types import SimpleNamespace
from nvlm.data.cli import memory_mib, processor
from nvlm.data.blend import Blend, SampleStream, Source
from nvlm.data.formats import read_records
from nvlm.data.sources import open_mixture
args = SimpleNamespace(model=None, tile_size=32, tokens_per_tile=4, max_tiles=6)
proc = processor(args)
base = memory_mib()
t0 = time.perf_counter()
if {legacy}:
    blend = Blend([Source("s", list(read_records({path!r})))], seed=0)
else:
    blend = open_mixture([SimpleNamespace(path={path!r}, name="s", weight=1.0, image_root=None)], seed=0)
stream = SampleStream(blend, proc, 512, rank=1, world_size=8)
stream.batch(16)
startup = time.perf_counter() - t0
after_start = memory_mib()
t1 = time.perf_counter()
for _ in range(125):
    stream.batch(16)
rate = 2000 / (time.perf_counter() - t1)
print(json.dumps({{"startup_s": startup, "rss_base": base, "rss_start": after_start, "rss_2k": memory_mib(),
                  "samples_per_s": rate, "counts": dict(stream.counts)}}))
"""

INDEX = """
import json, time
from nvlm.data.sources import open_sources
t0 = time.perf_counter()
(src,) = open_sources({path!r})
print(json.dumps({{"index_s": time.perf_counter() - t0, "records": len(src.records)}}))
"""


def scale(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NVLM_INDEX_DIR": str(args.out / "index")}
    rows = []
    for kind in args.kinds.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            folder = args.out / f"{kind}-{n}"
            t0 = time.perf_counter()
            if kind == "jsonl":
                path = write_jsonl(folder, n, png_bytes, distinct=1000)
            elif kind == "wds":
                path = write_wds(folder, n, png_bytes, "png")
            else:
                path = write_parquet(folder, n, png_bytes)
            written = time.perf_counter() - t0
            index = run(INDEX.format(path=path), env)
            probes = [("indexed", False)] + ([("legacy", True)] if args.legacy and kind == "jsonl" else [])
            for label, legacy in probes:
                m = run(PROBE.format(path=path, legacy=legacy), env)
                row = {"kind": kind if not legacy else "jsonl, all in memory", "samples": n, "write_s": written}
                rows.append({**row, **index, **m, "mode": label})
                print(json.dumps(rows[-1]), flush=True)
    print("\nRSS MiB (all / not file-backed) before opening the source, after start-up and after 2,000 samples:")
    print("| source | samples | index build s | start-up s | before open | after start-up | after 2k samples |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        index_s = f"{r['index_s']:.2f}" if r["mode"] == "indexed" else "–"
        mem = " | ".join(f"{r[k]['rss']:.0f} / {r[k]['anon']:.0f}" for k in ("rss_base", "rss_start", "rss_2k"))
        print(f"| {r['kind']} | {r['samples']:,} | {index_s} | {r['startup_s']:.2f} | {mem} |")


def read_rate(path: str, limit: int) -> float:
    """Records/s reading records and their image bytes in an epoch's order (no decoding)."""
    from nvlm.data.order import EpochOrder
    from nvlm.data.sources import open_sources

    (src,) = open_sources(path)
    order = EpochOrder(len(src.records), "bench")
    t0 = time.perf_counter()
    for k in range(min(limit, len(src.records))):
        conv = src.records[order(0, k)]
        for im in conv.images:
            if isinstance(im, str):
                Path(im).read_bytes()
    return min(limit, len(src.records)) / (time.perf_counter() - t0)


def formats(args: argparse.Namespace) -> None:
    os.environ["NVLM_INDEX_DIR"] = str(args.out / "index")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    n = args.samples

    def jpeg(i: int) -> bytes:
        return png_bytes(i, (640, 480), "JPEG")

    paths = {
        "JSONL + loose JPEG files": write_jsonl(args.out / f"fmt-jsonl-{n}", n, jpeg, distinct=n),
        "WebDataset shards": write_wds(args.out / f"fmt-wds-{n}", n, jpeg, "jpg", per_shard=max(1, n // 4)),
        "Parquet (LLaVA-OneVision layout)": write_parquet(args.out / f"fmt-parquet-{n}", n, jpeg, per_file=n),
    }
    rows = []
    for name, path in paths.items():
        row = {"format": name, "read_per_s": read_rate(path, n)}
        for w in (int(x) for x in args.workers.split(",")):
            cmd = [sys.executable, "-m", "nvlm.data.cli", "bench", path, "--workers", str(w), "--samples", str(n)]
            out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                raise SystemExit(f"nvlm data bench failed:\n{out.stderr[-3000:]}")
            row[f"workers_{w}"] = json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    workers = [f"workers_{w}" for w in args.workers.split(",")]
    print("\n| format | records + image bytes read/s | " + " | ".join(f"samples/s, {w}" for w in workers) + " |")
    print("|---|---|" + "---|" * len(workers))
    for r in rows:
        print(f"| {r['format']} | {r['read_per_s']:.0f} | " + " | ".join(f"{r[w]:.1f}" for w in workers) + " |")


def bench(path: str, workers: int, samples: int, env: dict[str, str]) -> dict:
    """``nvlm data bench`` at the demo's shapes, in a process of its own."""
    shapes = ["--tile-size", "32", "--tokens-per-tile", "4", "--max-tiles", "6", "--max-seq-len", "160"]
    cmd = [sys.executable, "-m", "nvlm.data.cli", "bench", path, "--workers", str(workers), "--samples", str(samples)]
    out = subprocess.run(cmd + ["--batch", "32", *shapes, "--json"], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"nvlm data bench failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo(args: argparse.Namespace) -> None:
    from nvlm.demo import synthetic

    root = args.out / f"demo-{args.per_task}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NVLM_INDEX_DIR": str(args.out / "index")}
    os.environ["NVLM_INDEX_DIR"] = env["NVLM_INDEX_DIR"]
    if not (root / "data" / "manifest.json").exists():
        synthetic.generate(root / "data", args.per_task, 10, n_text_scene=50)
    jsonl = root / "data" / "vision.jsonl"  # every vision task's training records; images relative to data/
    jsonl.write_text("".join((root / "data" / "train" / f"{t}.jsonl").read_text() for t in synthetic.TASKS))
    shards = root / "wds"
    if not shards.exists():
        cmd = [sys.executable, "-m", "nvlm.data.cli", "pack", str(jsonl), str(shards), "--shard-size", "16MB"]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = []
    for name, path in (("JSONL + loose PNG files", str(jsonl)), ("WebDataset shards (nvlm data pack)", str(shards))):
        for w in (0, 2, 4):
            r = bench(path, w, args.samples, env)
            rows.append(
                {"format": name, "workers": w, "samples_per_s": r["samples_per_s"], "startup_s": r["startup_s"]}
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(jsonl.read_text().splitlines()):,} records; nvlm data bench --samples {args.samples} --batch 32")
    print("| format | workers | samples/s | start-up s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['workers']} | {r['samples_per_s']:.1f} | {r['startup_s']:.2f} |")
    train_wait(root, args.steps)


def train_wait(root: Path, steps: int) -> None:
    """The demo's stage 2 with 2 data workers: per-step data_wait_s against the step time."""
    import statistics

    from nvlm.demo.backbone import build_tokenizer, pretrain_llm, save_vision
    from nvlm.demo.pipeline import Budget, stage_config
    from nvlm.training.metrics import read_metrics
    from nvlm.training.trainer import Trainer

    if not (root / "backbones" / "vision").exists():  # stand-ins: the loader, not the answers, is measured
        tokenizer = build_tokenizer(root / "data")
        pretrain_llm(root / "backbones" / "llm", tokenizer, [(root / "data" / "train" / "add.jsonl", 1.0)], 1)
        save_vision(root / "backbones" / "vision", 0)
    cfg = stage_config("D", "sft", root, Budget(0, 0, 0, 0, steps))
    cfg.data.workers, cfg.train.log_every, cfg.train.save_every = 2, 1, 0
    out = root / f"train-workers2-{time.time_ns()}"
    Trainer(cfg, out, log=lambda *a, **k: None).run()
    rows = read_metrics(out / "metrics.jsonl")[2:]  # the first steps include the workers' start-up
    waits = [r["data_wait_s"] for r in rows]
    step_s = [cfg.train.global_batch_size / r["samples_per_s"] for r in rows]
    print(f"\ndemo stage 2, NVLM-D, batch {cfg.train.global_batch_size}, data.workers=2, steps 3-{steps}:")
    print(f"data_wait_s median {statistics.median(waits):.4f}, max {max(waits):.4f}, total {sum(waits):.2f}; "
          f"step compute median {statistics.median(step_s):.3f} s, total {sum(step_s):.2f} s")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scale", help="RSS and start-up at several data set sizes")
    s.add_argument("--sizes", default="10000,100000,1000000")
    s.add_argument("--kinds", default="jsonl,wds,parquet")
    s.add_argument("--legacy", action="store_true", help="also the all-in-memory JSONL path")
    f = sub.add_parser("formats", help="loader throughput: JSONL + loose files vs WebDataset vs Parquet")
    f.add_argument("--samples", type=int, default=300)
    f.add_argument("--workers", default="0,2")
    d = sub.add_parser("demo", help="the demo's shapes: 0/2/4 workers, JSONL vs shards, and a run's data wait")
    d.add_argument("--per-task", type=int, default=300, help="training images per vision task")
    d.add_argument("--samples", type=int, default=1024)
    d.add_argument("--steps", type=int, default=40)
    for q in (s, f, d):
        q.add_argument("--out", type=Path, default=Path("/tmp/nvlm-data-bench"))
    args = p.parse_args()
    {"scale": scale, "formats": formats, "demo": demo}[args.cmd](args)


if __name__ == "__main__":
    main()
