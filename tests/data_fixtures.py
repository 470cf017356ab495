"""Tiny data sets of every source kind, written by the tests themselves (Pillow PNGs, pyarrow tables, tarfile).

Record i of every kind asks about a picture and is answered ``"<kind> <i>"``, so a test can tell which record
it got from the conversation alone.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import picture


def png(i: int, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    picture(*size, seed=i).save(buf, format="PNG")
    return buf.getvalue()


def answer(kind: str, i: int) -> str:
    return f"{kind} {i}"


def write_jsonl(root: Path, n: int, name: str = "conv") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.jsonl", "w") as f:
        for i in range(n):
            (root / f"img/{name}{i}.png").write_bytes(png(i))
            turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer(name, i)}]
            f.write(json.dumps({"image": f"img/{name}{i}.png", "conversations": turns}) + "\n")
            if i % 3 == 1:
                f.write("\n")  # blank lines are skipped, and line numbers still name the record
    return root / f"{name}.jsonl"


def write_llava_parquet(root: Path, n: int, row_group: int = 4) -> Path:
    rows = {
        "id": [f"ov{i}" for i in range(n)],
        "image": [None if i % 4 == 3 else {"bytes": png(i), "path": f"{i}.png"} for i in range(n)],
        "conversations": [
            [
                {"from": "human", "value": ("<image>\n" if i % 4 != 3 else "") + "What?"},
                {"from": "gpt", "value": answer("llava", i)},
            ]
            for i in range(n)
        ],
    }
    path = root / "llava_ov.parquet"
    pq.write_table(pa.table(rows), path, row_group_size=row_group)
    return path


def write_cauldron_parquet(root: Path, n: int, finevision: bool = False, files: int = 2) -> Path:
    folder = root / ("finevision" if finevision else "cauldron")
    folder.mkdir(parents=True)
    kind = "finevision" if finevision else "cauldron"
    per = -(-n // files)
    for f in range(files):
        ids = range(f * per, min(n, (f + 1) * per))
        rows: dict = {
            "images": [[{"bytes": png(i), "path": None}] for i in ids],
            "texts": [[{"user": "What?", "assistant": answer(kind, i), "source": "synthetic"}] for i in ids],
        }
        if finevision:
            rows["source"] = ["synthetic" for _ in ids]
            rows["relevance_ratings"] = [[5] for _ in ids]
        pq.write_table(pa.table(rows), folder / f"train-{f:05d}.parquet", row_group_size=3)
    return folder


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, n: int, shards: int = 3, caption: bool = False) -> str:
    """WebDataset shards: an image with a JSON conversation (or a .txt caption); returns the brace pattern."""
    kind = "caption" if caption else "wds"
    folder = root / kind
    folder.mkdir(parents=True)
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                _add(tar, f"sample{i:06d}.png", png(i))
                if caption:
                    _add(tar, f"sample{i:06d}.txt", answer(kind, i).encode())
                else:
                    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer(kind, i)}]
                    _add(tar, f"sample{i:06d}.json", json.dumps({"conversations": turns}).encode())
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def write_internvl_meta(root: Path, n: int) -> Path:
    folder = root / "internvl"
    folder.mkdir(parents=True)
    write_jsonl(folder / "a", n, "meta_a")
    write_jsonl(folder / "b", n, "meta_b")
    meta = {
        "meta_a": {"root": "a", "annotation": "a/meta_a.jsonl", "repeat_time": 1, "length": n},
        "meta_b": {"root": "b", "annotation": "b/meta_b.jsonl", "repeat_time": 2, "max_dynamic_patch": 2},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"


def every_kind(root: Path, n: int) -> dict[str, str]:
    """{kind: path} of one small source of each kind, all under `root`."""
    return {
        "jsonl": str(write_jsonl(root / "jsonl", n)),
        "llava": str(write_llava_parquet(root, n)),
        "cauldron": str(write_cauldron_parquet(root, n)),
        "finevision": str(write_cauldron_parquet(root, n, finevision=True)),
        "wds": write_shards(root, n),
        "caption": write_shards(root, n, caption=True),
        "internvl": str(write_internvl_meta(root, n)),
    }
