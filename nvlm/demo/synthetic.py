"""Synthetic training and held-out data for ``nvlm demo``: NVLM 1.0's data recipe in miniature.

The paper trains NVLM in two stages: stage 1 (pretraining) aligns a frozen LLM and vision encoder through
the projector on captioning data; stage 2 (SFT) trains on task data (VQA, counting, charts, OCR, ...)
blended with text-only SFT data, which keeps the LLM's text skills from regressing. The demo replays that
on 2 CPU cores with tiny random-init models, so the data are tiny too, drawn with Pillow at the scale of
32 px tiles (see :mod:`nvlm.demo.draw`), and each stands in for a paper data type:

* five scored vision tasks (:data:`TASKS`): ``color`` and ``quadrant`` (VQA), ``count`` (counting),
  ``bars`` (chart reading) and ``read`` (OCR: one large glyph, see :class:`ReadConfig`);
* ``caption``: a short description of every training image, for stage 1;
* text only: single-digit addition with 20 of the 100 pairs held out (the text-regression check),
  "text-scene" items, a scene described in words followed by a task's question, which give the tiny text
  LLM the answer vocabulary that a real pretrained LLM would bring, and "text-caption" items, the caption
  prompt answered by a scene's description with no image: a real LLM can write such sentences, the tiny one
  must learn to, or stage 1's captions are text its frozen weights were never trained to produce.

:func:`generate` writes LLaVA-format JSONL plus PNGs and a manifest; held-out images come from a different
random stream than training, and any held-out image whose pixels equal a training image's is redrawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from nvlm.demo import draw
from nvlm.demo.draw import ReadConfig

__all__ = [
    "TASKS",
    "TEXT_TASKS",
    "CAPTION_PROMPT",
    "ReadConfig",
    "TaskSpec",
    "Example",
    "make_example",
    "generate",
    "score",
    "fresh_question",
    "add_split",
]

CAPTION_PROMPT = "Describe the image briefly."
FORMAT = "nvlm-demo-synthetic/1"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    chance: float  # accuracy of guessing uniformly among the answers the generator can give
    answers: tuple[str, ...] | None
    description: str
    questions: tuple[str, ...] = ()  # question templates; the demo uses one per task, fixed


@dataclass
class Example:  # built by make_example: always a drawn image and its caption
    image: Image.Image
    question: str
    answer: str
    task: str
    caption: str


_READ = ReadConfig()
TASKS: dict[str, TaskSpec] = {
    "color": TaskSpec(
        "color",
        1 / len(draw.PALETTE),
        tuple(draw.PALETTE),
        "one shape in one of 6 colors; answer the color word",
        ("What color is the shape?",),
    ),
    "quadrant": TaskSpec(
        "quadrant",
        1 / 4,
        draw.QUADRANTS,
        "one black disc away from the centre lines; answer its quadrant",
        ("In which quadrant is the disc?",),
    ),
    "count": TaskSpec(
        "count", 1 / 5, tuple("12345"), "1-5 non-touching shapes; answer how many", ("How many shapes are there?",)
    ),
    "bars": TaskSpec(
        "bars",
        sum(1 / n for n in draw.BAR_COUNTS) / len(draw.BAR_COUNTS),
        tuple("12345"),
        "3-5 bars, the tallest >= 12 % of the plot above the next; answer its 1-based index",
        ("Which bar is the tallest?",),
    ),
    "read": TaskSpec(
        "read",
        1 / len(_READ.glyphs),
        tuple(_READ.glyphs),
        "one large dark glyph inside one tile of a multi-tile image; answer the glyph",
        ("What character is written in the image?",),
    ),
}
TEXT_TASKS: dict[str, TaskSpec] = {
    "add": TaskSpec(
        "add",
        1 / 19,
        tuple(str(s) for s in range(19)),
        "single-digit addition, text only; scored on 20 held-out pairs",
        ("What is {a}+{b}?",),
    ),
}


def _stream(seed: int, stream: str, task: str) -> random.Random:
    # One independent stream per (seed, split, task): train and test never share draws, and adding a task
    # or changing one task's count leaves every other task's data unchanged. String seeds are hashed with
    # SHA-512 by `random`, so they are stable across processes (unlike hash()).
    return random.Random(f"nvlm-demo/{seed}/{stream}/{task}")


def _scene(task: str, rng: random.Random, read: ReadConfig | None = None, **params) -> draw.Scene:
    if task == "read":
        cfg = dataclasses.replace(read or _READ, **params)
        return draw.sample_read(rng, cfg)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if params or read is not None:
        raise TypeError(f"task {task!r} takes no parameters, got {sorted(params) or ['read']}")
    return getattr(draw, f"sample_{task}")(rng)


def make_example(task: str, rng: random.Random, **params) -> Example:
    """One drawn example of a vision task. For ``read``, ``read=ReadConfig(...)`` and/or ReadConfig fields."""
    scene = _scene(task, rng, **params)
    question = rng.choice(TASKS[task].questions)
    return Example(draw.render(scene), question, scene.answer, task, scene.caption)


def fresh_question(seed: int, task: str | None = None, read: ReadConfig | None = None) -> Example:
    """A newly drawn example from a stream no training or test split uses (for the demo's last step)."""
    rng = random.Random(f"nvlm-demo/fresh/{seed}")
    task = task or rng.choice(sorted(TASKS))
    return make_example(task, rng, **({"read": read} if task == "read" and read else {}))


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def score(task: str, prediction: str, answer: str) -> bool:
    """Normalised exact match (strip, lowercase, collapse spaces, drop trailing periods); same for every task."""
    return _normalise(prediction) == _normalise(answer)


def add_split(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The 100 ordered pairs (a, b), 0 <= a, b <= 9, split 80 train / 20 held out, deterministically per seed."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    _stream(seed, "split", "add").shuffle(pairs)
    return sorted(pairs[:80]), sorted(pairs[80:])


def _record(rid: str, question: str, answer: str, task: str, image: str | None = None) -> dict:
    rec: dict = {"id": rid}
    if image is not None:
        rec["image"] = image
        question = f"<image>\n{question}"
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    rec["task"] = task
    return rec


def _pixel_hash(im: Image.Image) -> str:
    return hashlib.sha256(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest()


def _images(
    out: Path,
    split: str,
    task: str,
    n: int,
    rng: random.Random,
    cfg: ReadConfig,
    exclude: set[str],
    hashes: dict[str, str],
) -> tuple[list[dict], list[dict], int]:
    """Draw, save and describe `n` images; redraw any whose pixels are in `exclude`. → (records, captions, dropped)."""
    recs: list[dict] = []
    caps: list[dict] = []
    dropped = 0
    params = {"read": cfg} if task == "read" else {}
    while len(recs) < n:
        ex = make_example(task, rng, **params)
        h = _pixel_hash(ex.image)
        if h in exclude:
            dropped += 1
            if dropped > 1000 + 10 * n:
                raise RuntimeError(f"{task}: too many held-out images equal training images")
            continue
        i = len(recs)
        rel = f"images/{split}/{task}_{i:06d}.png"
        ex.image.save(out / rel, format="PNG", compress_level=1)  # tiny images: zlib level 1 is plenty
        hashes[rel] = h
        recs.append(_record(f"{split}_{task}_{i:06d}", ex.question, ex.answer, task, rel))
        caps.append(_record(f"caption_{task}_{i:06d}", CAPTION_PROMPT, ex.caption, "caption", rel))
    return recs, caps, dropped


def _write_jsonl(path: Path, records: list[dict], hashes: dict[str, str], out: Path) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(data)
    hashes[path.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()


# Long on purpose: the data set's recipe in the order it is written (tasks, splits, text-only sets, manifest).
def generate(
    out_dir: str | Path,
    n_train_per_task: int,
    n_test_per_task: int,
    seed: int = 0,
    tasks: list[str] | tuple[str, ...] | None = None,
    read: ReadConfig | None = None,
    n_text_scene: int = 2000,
) -> dict:
    """Write the demo's data set under `out_dir` and return its manifest (also written as manifest.json).

    Layout: ``images/{train,test}/{task}_{i:06d}.png``; ``{train,test}/{task}.jsonl`` (LLaVA format);
    ``train/caption.jsonl`` (one caption per training image); ``train/add.jsonl``, ``test/add.jsonl`` and
    ``train/text_scene.jsonl`` and ``train/text_caption.jsonl`` (``n_text_scene`` per task, the same scenes),
    text only. Same arguments → same bytes.
    """
    out, cfg = Path(out_dir), read or _READ
    tasks = list(TASKS) if tasks is None else list(tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; expected some of {sorted(TASKS)}")
    for d in ("images/train", "images/test", "train", "test"):
        (out / d).mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}  # relative path → sha256 of the pixels (PNG) or of the bytes (JSONL)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    dropped: dict[str, int] = {}
    captions, scenes, described = [], [], []
    for t in tasks:
        for split in ("train", "test"):  # images left by an earlier, larger run would look like data
            for stale in (out / "images" / split).glob(f"{t}_*.png"):
                stale.unlink()
        train, caps, _ = _images(out, "train", t, n_train_per_task, _stream(seed, "train", t), cfg, set(), hashes)
        seen = {hashes[r["image"]] for r in train}
        test, _, dropped[t] = _images(out, "test", t, n_test_per_task, _stream(seed, "test", t), cfg, seen, hashes)
        _write_jsonl(out / "train" / f"{t}.jsonl", train, hashes, out)
        _write_jsonl(out / "test" / f"{t}.jsonl", test, hashes, out)
        counts["train"][t], counts["test"][t] = len(train), len(test)
        captions += caps
        rng = _stream(seed, "text_scene", t)
        for i in range(n_text_scene):
            s = _scene(t, rng, **({"read": cfg} if t == "read" else {}))
            q = f"{s.caption[0].upper()}{s.caption[1:]}. {TASKS[t].questions[0]}"
            scenes.append(_record(f"text_scene_{t}_{i:06d}", q, s.answer, t))
            described.append(_record(f"text_caption_{t}_{i:06d}", CAPTION_PROMPT, s.caption, "text_caption"))
    add_train, add_test = add_split(seed)
    for split, pairs in (("train", add_train), ("test", add_test)):
        recs = [_record(f"add_{a}_{b}", f"What is {a}+{b}?", str(a + b), "add") for a, b in pairs]
        _write_jsonl(out / split / "add.jsonl", recs, hashes, out)
        counts[split]["add"] = len(recs)
    _write_jsonl(out / "train" / "caption.jsonl", captions, hashes, out)
    _write_jsonl(out / "train" / "text_scene.jsonl", scenes, hashes, out)
    _write_jsonl(out / "train" / "text_caption.jsonl", described, hashes, out)
    counts["train"]["caption"], counts["train"]["text_scene"] = len(captions), len(scenes)
    counts["train"]["text_caption"] = len(described)

    specs = {t: dataclasses.asdict(TASKS[t]) for t in tasks}
    if "read" in specs:  # the read task's answers and chance follow the ReadConfig actually used
        specs["read"].update(answers=list(cfg.glyphs), chance=1 / len(cfg.glyphs))
    content = hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in sorted(hashes.items())).encode()).hexdigest()
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "tasks": specs,
        "text_tasks": {k: dataclasses.asdict(v) for k, v in TEXT_TASKS.items()},
        "counts": counts,
        "test_images_redrawn_as_duplicates_of_train": dropped,
        "params": {
            "n_train_per_task": n_train_per_task,
            "n_test_per_task": n_test_per_task,
            "n_text_scene_per_task": n_text_scene,
            "tile": draw.TILE,
            "grids": [list(g) for g in draw.GRIDS],
            "palette": draw.PALETTE,
            "bar_counts": list(draw.BAR_COUNTS),
            "read": dataclasses.asdict(cfg),
            "caption_prompt": CAPTION_PROMPT,
            "add_test_pairs": [list(p) for p in add_test],
        },
        "content_sha256": content,  # over JSONL bytes and image *pixels*, so PNG/zlib versions don't matter
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return json.loads(json.dumps(manifest))  # the same plain-JSON view a reader of manifest.json gets
