"""The demo's synthetic data: determinism, held-out disjointness, answers that match the pixels, LLaVA files.

Run: python -m pytest tests/test_synthetic.py -q
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvlm.demo import draw, synthetic
from nvlm.demo.synthetic import TASKS, ReadConfig, add_split, fresh_question, generate, make_example, score

N_TRAIN, N_TEST, N_SCENE = 30, 15, 25


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn")
    return out, generate(out, N_TRAIN, N_TEST, seed=0, n_text_scene=N_SCENE)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(path: Path) -> str:
    with Image.open(path) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def _array(ex) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 int array, background colour = the most common pixel)."""
    a = np.asarray(ex.image, dtype=np.int32)
    bg = Counter(map(tuple, a.reshape(-1, 3))).most_common(1)[0][0]
    return a, np.array(bg)


def _components(mask: np.ndarray) -> int:
    """Number of 8-connected components of True pixels (plain BFS: the images are at most 96 x 64)."""
    seen, n = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        n, stack = n + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
    return n


def test_same_seed_same_files_other_seed_other_data(data, tmp_path):
    root, manifest = data
    again = generate(tmp_path / "again", N_TRAIN, N_TEST, seed=0, n_text_scene=N_SCENE)
    assert again == manifest
    assert _files(tmp_path / "again") == _files(root)
    other = generate(tmp_path / "other", N_TRAIN, N_TEST, seed=1, n_text_scene=N_SCENE)
    assert other["content_sha256"] != manifest["content_sha256"]
    assert _jsonl(tmp_path / "other/train/color.jsonl") != _jsonl(root / "train/color.jsonl")


def test_llava_jsonl_well_formed(data):
    root, manifest = data
    ids = set()
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for task, spec in TASKS.items():
            recs = _jsonl(root / split / f"{task}.jsonl")
            assert len(recs) == n == manifest["counts"][split][task]
            for r in recs:
                assert set(r) == {"id", "image", "conversations", "task"} and r["task"] == task
                human, gpt = r["conversations"]
                assert human["from"] == "human" and gpt["from"] == "gpt"
                assert human["value"] == "<image>\n" + spec.questions[0] and gpt["value"] in spec.answers
                assert r["image"] == f"images/{split}/{task}_{int(r['id'][-6:]):06d}.png"
                with Image.open(root / r["image"]) as im:
                    assert im.format == "PNG" and im.size[0] in (32, 64, 96) and im.size[1] in (32, 64)
                ids.add(r["id"])
    captions = _jsonl(root / "train/caption.jsonl")
    assert len(captions) == len(TASKS) * N_TRAIN == manifest["counts"]["train"]["caption"]
    assert {c["image"] for c in captions} == {r["image"] for t in TASKS for r in _jsonl(root / f"train/{t}.jsonl")}
    assert all(c["conversations"][0]["value"] == "<image>\n" + synthetic.CAPTION_PROMPT for c in captions)
    for name in ("train/add.jsonl", "test/add.jsonl", "train/text_scene.jsonl", "train/text_caption.jsonl"):
        for r in _jsonl(root / name):
            assert "image" not in r and "<image>" not in r["conversations"][0]["value"]
            assert [m["from"] for m in r["conversations"]] == ["human", "gpt"]
            ids.add(r["id"])
    ids.update(c["id"] for c in captions)
    assert len(ids) == sum(sum(v.values()) for v in manifest["counts"].values())  # ids are unique


def test_test_images_disjoint_from_train(data):
    root, _ = data
    train = {_pixels(p) for p in (root / "images/train").glob("*.png")}
    test = {_pixels(p) for p in (root / "images/test").glob("*.png")}
    assert len(test) > 0 and not train & test


def test_test_images_equal_to_train_are_redrawn(tmp_path, monkeypatch):
    real = synthetic._stream
    # Give the test split the training stream: its first N_TRAIN draws repeat the training images exactly.
    monkeypatch.setattr(synthetic, "_stream", lambda seed, s, t: real(seed, "train" if s == "test" else s, t))
    m = generate(tmp_path, 8, 5, tasks=["color", "read"], n_text_scene=0)
    assert m["test_images_redrawn_as_duplicates_of_train"] == {"color": 8, "read": 8}
    assert m["counts"]["test"]["color"] == 5
    train = {_pixels(p) for p in (tmp_path / "images/train").glob("*.png")}
    assert not train & {_pixels(p) for p in (tmp_path / "images/test").glob("*.png")}


def test_count_answer_is_the_number_of_shapes():
    rng = random.Random(1)
    for _ in range(40):
        ex = make_example("count", rng)
        a, bg = _array(ex)
        assert _components((a != bg).any(-1)) == int(ex.answer)
        colours = {tuple(c) for c in a.reshape(-1, 3)} - {tuple(bg)}
        assert colours <= set(draw.PALETTE.values())
        assert ex.caption.startswith(f"{ex.answer} shape")


def test_color_answer_is_the_shape_colour():
    rng = random.Random(2)
    for _ in range(40):
        ex = make_example("color", rng)
        a, bg = _array(ex)
        ink = a[(a != bg).any(-1)]
        assert len(ink) > 20 and (ink == draw.PALETTE[ex.answer]).all()
        assert ex.answer in ex.caption


def test_quadrant_answer_is_where_the_disc_is():
    rng = random.Random(3)
    for _ in range(40):
        ex = make_example("quadrant", rng)
        a, _ = _array(ex)
        ys, xs = np.nonzero((a < 60).all(-1))
        h, w = a.shape[:2]
        assert len(xs) > 10
        left, top = xs.max() + 1 <= w / 2 - 0.08 * w, ys.max() + 1 <= h / 2 - 0.08 * h
        right, bottom = xs.min() >= w / 2 + 0.08 * w, ys.min() >= h / 2 + 0.08 * h
        assert (left or right) and (top or bottom)
        assert ex.answer == f"{'top' if top else 'bottom'} {'left' if left else 'right'}"


def test_bars_answer_is_the_tallest_bar():
    rng = random.Random(4)
    for _ in range(40):
        ex = make_example("bars", rng)
        a, bg = _array(ex)
        col_heights = (a != bg).any(-1).sum(0)
        bars, prev = [], 0
        for hgt in col_heights:  # runs of non-empty columns are bars
            if hgt and not prev:
                bars.append(0)
            if hgt:
                bars[-1] = max(bars[-1], int(hgt))
            prev = hgt
        assert 3 <= len(bars) <= 5
        order = sorted(bars, reverse=True)
        assert ex.answer == str(bars.index(order[0]) + 1)
        assert order[0] - order[1] >= 0.12 * (a.shape[0] - 6)


def _binary_crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Best IoU of two binary glyph crops, allowing for a pixel of difference in size (rounding at 0.5)."""
    if abs(a.shape[0] - b.shape[0]) > 1 or abs(a.shape[1] - b.shape[1]) > 1:
        return 0.0
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    best = 0.0
    for dy in range(h - a.shape[0] + 1):
        for dx in range(w - a.shape[1] + 1):
            pa, pb = np.zeros((h, w), bool), np.zeros((h, w), bool)
            pa[dy : dy + a.shape[0], dx : dx + a.shape[1]] = a
            pb[: b.shape[0], : b.shape[1]] = b
            best = max(best, (pa & pb).sum() / (pa | pb).sum())
    return best


@pytest.mark.parametrize("cfg", [ReadConfig(), ReadConfig(glyphs="AEHKOX", stroke_width=0)])
def test_read_glyph_is_inside_one_tile_and_is_the_answer(cfg):
    rng = random.Random(5)
    sizes = range(round(cfg.font_frac[0] * draw.TILE), round(cfg.font_frac[1] * draw.TILE) + 1)
    for _ in range(25):
        ex = make_example("read", rng, read=cfg)
        assert ex.answer in cfg.glyphs
        a, bg = _array(ex)
        assert a.shape[0] * a.shape[1] >= 2 * 32 * 32  # a multi-tile image
        diff = np.abs(a - bg).sum(-1)
        ys, xs = np.nonzero(diff)
        assert xs.min() // 32 == xs.max() // 32 and ys.min() // 32 == ys.max() // 32  # one tile holds all ink
        # Undo the anti-aliased blend (the darkest pixel is fully inked), then match against every glyph
        # at every size the config allows: the answer's glyph must be the one drawn.
        drawn = _binary_crop(diff / diff.max() > 0.5)
        scores = {
            g: max(_iou(drawn, _binary_crop(np.asarray(draw.glyph_mask(g, s, cfg.stroke_width)) > 127)) for s in sizes)
            for g in cfg.glyphs
        }
        assert max(scores, key=scores.get) == ex.answer and scores[ex.answer] > 0.9, scores


def test_chance_levels(data, tmp_path):
    assert TASKS["color"].chance == pytest.approx(1 / 6) and TASKS["quadrant"].chance == 0.25
    assert TASKS["count"].chance == 0.2 and TASKS["read"].chance == pytest.approx(0.1)
    assert TASKS["bars"].chance == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    rng = random.Random(6)
    drawn = [len(draw.sample_bars(rng).caption.split(",")) + 1 for _ in range(3000)]
    assert np.mean([1 / n for n in drawn]) == pytest.approx(TASKS["bars"].chance, abs=0.01)
    _, manifest = data
    assert manifest["tasks"]["bars"]["chance"] == TASKS["bars"].chance
    m = generate(tmp_path, 2, 2, tasks=["read"], read=ReadConfig(glyphs="AEHK"), n_text_scene=0)
    assert m["tasks"]["read"]["chance"] == 0.25 and m["tasks"]["read"]["answers"] == list("AEHK")


def test_score_normalises():
    assert score("color", "  Red. ", "red") and score("quadrant", "Top  Left", "top left")
    assert score("count", "3.", "3") and score("read", "a", "A")
    assert not score("color", "reds", "red") and not score("count", "34", "3")
    assert not score("quadrant", "top", "top left")


def test_add_split_80_20(data):
    root, manifest = data
    train, test = add_split(0)
    assert len(train) == 80 and len(test) == 20 and not set(train) & set(test)
    assert set(train) | set(test) == {(a, b) for a in range(10) for b in range(10)}
    assert add_split(0) == (train, test) and add_split(1) != (train, test)
    for split, pairs in (("train", train), ("test", test)):
        recs = _jsonl(root / split / "add.jsonl")
        assert [r["conversations"][0]["value"] for r in recs] == [f"What is {a}+{b}?" for a, b in pairs]
        assert [r["conversations"][1]["value"] for r in recs] == [str(a + b) for a, b in pairs]
    assert manifest["params"]["add_test_pairs"] == [list(p) for p in test]


def test_text_caption_describes_the_text_scenes(data):
    root, _ = data
    scenes, described = _jsonl(root / "train/text_scene.jsonl"), _jsonl(root / "train/text_caption.jsonl")
    assert len(described) == len(scenes) == len(TASKS) * N_SCENE
    for s, c in zip(scenes, described):
        assert c["conversations"][0]["value"] == synthetic.CAPTION_PROMPT  # no image: the LLM's own prior
        caption = c["conversations"][1]["value"]
        assert s["conversations"][0]["value"].startswith(caption[0].upper() + caption[1:] + ". ")


def test_text_scene_answer_follows_from_the_description(data):
    root, _ = data
    recs = _jsonl(root / "train/text_scene.jsonl")
    assert Counter(r["task"] for r in recs) == {t: N_SCENE for t in TASKS}
    for r in recs:
        q, ans = r["conversations"][0]["value"], r["conversations"][1]["value"]
        spec = TASKS[r["task"]]
        assert q.endswith(". " + spec.questions[0]) and ans in spec.answers
        scene = q[: -len(spec.questions[0]) - 2]
        if r["task"] == "bars":
            heights = [int(h) for h in scene.split("heights ")[1].replace(" and", ",").split(", ")]
            assert str(heights.index(max(heights)) + 1) == ans
        elif r["task"] == "count":
            assert scene.count(" a ") + scene.count(" an ") == int(ans)
        else:
            assert scene.endswith(ans) or f" {ans} " in f" {scene} "


def test_fresh_question_is_deterministic_and_valid():
    a, b = fresh_question(7), fresh_question(7)
    assert a.image is not None and a.image.tobytes() == b.image.tobytes() and a.answer == b.answer
    assert a.answer in TASKS[a.task].answers and a.question in TASKS[a.task].questions
    assert len({fresh_question(s).image.tobytes() for s in range(5)}) == 5
    assert fresh_question(3, task="read").task == "read"


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        make_example("nope", random.Random(0))
    with pytest.raises(TypeError):
        make_example("color", random.Random(0), font_frac=(0.5, 0.6))
    with pytest.raises(ValueError):
        ReadConfig(glyphs="11")
    with pytest.raises(ValueError):
        generate(tmp_path, 1, 1, tasks=["caption"])
