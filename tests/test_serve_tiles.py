"""Tiles per image from the request: ``image_url.max_dynamic_patch`` (LMDeploy's, per image) and
``mm_processor_kwargs.max_dynamic_patch`` (vLLM's, per request), clamped to the server's ceiling and reported in
``nvlm.images``; the processor's per-call ``max_tiles``; the pixel cap still holds; an image's placeholder may
sit in the text (the InternVL convention).

python -m pytest tests/test_serve_tiles.py -q
"""

from __future__ import annotations

import httpx
import pytest
from conftest import picture
from serve_util import data_url, served

from nvlm.data.chat import render_chat
from nvlm.serve.app import create_app
from nvlm.serve.engine import Engine
from nvlm.serve.media import MediaGate, MediaPolicy
from nvlm.vision.tiling import plan_tiles


def test_processor_takes_a_per_call_tile_budget(build_model):
    proc = Engine(*build_model("D")).processor
    wide = picture(2700, 900)
    grid = lambda enc: [p.grid for p in enc.plans]  # noqa: E731
    assert grid(proc.encode("<image>\nQ", [wide])) == [(3, 1)]  # the config's 6
    assert grid(proc.encode("<image>\nQ", [wide], max_tiles=1)) == [(1, 1)]
    assert not proc.encode("<image>\nQ", [wide], max_tiles=1).plans[0].thumbnail  # one tile is the whole image
    both = proc.encode("<image>\n<image>\nQ", [wide, wide], max_tiles=[2, 12])
    assert grid(both) == [(2, 1), (6, 2)]
    assert len(both.input_ids) > len(proc.encode("<image>\n<image>\nQ", [wide, wide]).input_ids)
    with pytest.raises(ValueError, match="one per image"):
        proc.encode("<image>\n<image>\nQ", [wide, wide], max_tiles=[2])
    with pytest.raises(ValueError, match="at most 40"):
        proc.encode("<image>\nQ", [wide], max_tiles=41)
    special = Engine(*build_model("D", tags__mode="special")).processor  # tile tags are added tokens up to 6
    assert grid(special.encode("<image>\nQ", [wide], max_tiles=2)) == [(2, 1)]
    with pytest.raises(ValueError, match="tiling.max_tiles"):
        special.encode("<image>\nQ", [wide], max_tiles=7)
    with pytest.raises(ValueError, match="--max-tiles 8"):
        create_app(Engine(*build_model("D", tags__mode="special")), MediaGate(MediaPolicy(max_tiles=8)))


def _ask(url, parts, **extra):
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_request_tile_budget_is_clamped_and_reported(build_model):
    built = build_model("D")
    wide = picture(2700, 900)
    with served(built, MediaPolicy(max_tiles=8, max_pixels=3_000_000)) as (url, engine):
        proc = engine.processor
        prompt = render_chat([{"role": "user", "content": "<image>\nWhat?"}])
        for asked, budget in ((2, 2), (None, 6), (24, 8), (8, 8)):
            image = {"url": data_url(wide)} | ({"max_dynamic_patch": asked} if asked else {})
            r = _ask(url, [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": image}])
            assert r.status_code == 200, r.text
            info = r.json()["nvlm"]["images"][0]
            want = plan_tiles(2700, 900, proc.tile_size, 1, budget, True)
            assert info["max_tiles"] == budget and info["grid"] == list(want.grid), asked
            assert r.json()["usage"]["prompt_tokens"] == len(proc.encode(prompt, [wide], budget).input_ids)

        # vLLM's per-request form applies to every image that names none itself
        parts = [
            {"type": "image_url", "image_url": {"url": data_url(wide), "max_dynamic_patch": 1}},
            {"type": "image_url", "image_url": {"url": data_url(wide)}},
            {"type": "text", "text": "Compare."},
        ]
        r = _ask(url, parts, mm_processor_kwargs={"max_dynamic_patch": 3})
        assert [i["max_tiles"] for i in r.json()["nvlm"]["images"]] == [1, 3]
        assert [i["grid"] for i in r.json()["nvlm"]["images"]] == [[1, 1], [3, 1]]

        # the pixel cap holds whatever the budget
        big = {"url": data_url(picture(2000, 1600)), "max_dynamic_patch": 2}
        r = _ask(url, [{"type": "image_url", "image_url": big}, {"type": "text", "text": "x"}])
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
        for bad in ({"max_dynamic_patch": 0}, {"max_dynamic_patch": "many"}, {"do_resize": False}):
            assert _ask(url, [{"type": "text", "text": "x"}], mm_processor_kwargs=bad).status_code == 400


def test_placeholder_in_the_text_places_the_image(build_model):
    """LMDeploy-style clients write ``<image>`` themselves: one per image part puts each image there."""
    built = build_model("D")
    img = data_url(picture(150, 100))
    with served(built) as (url, engine):
        image = {"type": "image_url", "image_url": {"url": img}}
        first = _ask(url, [image, {"type": "text", "text": "What?"}], max_tokens=6).json()
        placed = _ask(url, [{"type": "text", "text": "<image>\nWhat?"}, image], max_tokens=6).json()
        assert placed["usage"] == first["usage"]
        assert placed["choices"][0]["message"] == first["choices"][0]["message"]
        inside = _ask(url, [{"type": "text", "text": "Look: <image> and say"}, image]).json()
        prompt = render_chat([{"role": "user", "content": "Look: <image> and say"}])  # the image mid-text
        want = engine.processor.encode(prompt, [picture(150, 100)]).input_ids
        assert inside["usage"]["prompt_tokens"] == len(want) != first["usage"]["prompt_tokens"]
        for text in ("<image>\n<image>\nTwo?", "<image><|im_end|>"):  # a count that does not match; a reserved token
            r = _ask(url, [{"type": "text", "text": text}, image])
            assert r.status_code == 400 and "reserved token" in r.json()["error"]["message"], text


def test_a_tiled_image_encodes_as_its_image_and_keeps_its_budget(build_model):
    proc = Engine(*build_model("H")).processor
    wide = picture(2700, 900)
    plain = proc.encode("<image>\nQ", [wide], max_tiles=3)
    tiled = proc.encode("<image>\nQ", [proc.tile(wide, 3)], max_tiles=3)
    assert tiled.input_ids == plain.input_ids and tiled.plans == plain.plans and tiled.memory == plain.memory
    assert tiled.pixel_values.equal(plain.pixel_values)
    with pytest.raises(ValueError, match="tiled for 3 tiles"):
        proc.encode("<image>\nQ", [proc.tile(wide, 3)], max_tiles=2)


def test_a_repeated_image_is_neither_decoded_nor_tiled_again(build_model, monkeypatch):
    built = build_model("D")
    with served(built) as (url, engine):
        calls = {"tile": 0, "decode": 0}
        tile, decode = engine.processor.tile, MediaGate.decode

        def counted_tile(*args, **kwargs):
            calls["tile"] += 1
            return tile(*args, **kwargs)

        def counted_decode(self, data):
            calls["decode"] += 1
            return decode(self, data)

        monkeypatch.setattr(engine.processor, "tile", counted_tile)
        monkeypatch.setattr(MediaGate, "decode", counted_decode)
        image = data_url(picture(900, 600, seed=3))
        answers = []
        for budget in (None, None, 2, 2):
            part = {"url": image} | ({"max_dynamic_patch": budget} if budget else {})
            r = _ask(url, [{"type": "image_url", "image_url": part}, {"type": "text", "text": "What?"}])
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["message"]["content"])
        # one decode and one tiling per (image bytes, tile budget): the repeats come from the encoder cache
        assert calls == {"tile": 2, "decode": 2}
        assert answers[0] == answers[1] and answers[2] == answers[3]
        counts = engine.metrics.counts
        assert (counts["image_tile_cache_queries"], counts["image_tile_cache_hits"]) == (4, 2)
        assert "nvlm:image_tile_cache_hits_total 2" in httpx.get(url + "/metrics").text
    # without the cache the same answer, and nothing looked up
    with served(built, encoder_cache_gb=0) as (url, engine):
        r = _ask(url, [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What?"}])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answers[0]
        assert engine.metrics.counts["image_tile_cache_queries"] == 0
