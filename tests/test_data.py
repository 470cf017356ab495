"""Data: input formats round-trip, loss only on assistant tokens, blends, truncation, packing parity, recipes.

python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data import templates
from nvlm.data.blend import Blend, SampleStream, Source
from nvlm.data.formats import (
    Conversation,
    DataFormatError,
    chatml_segments,
    parse_record,
    read_records,
    to_llava,
    to_openai,
)
from nvlm.data.packing import collate_packed, pack_greedy


def test_llava_and_openai_round_trip(tmp_path):
    picture(60, 40).save(tmp_path / "a.png")
    llava = {
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A box."},
            {"from": "human", "value": "Color?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    conv = parse_record(llava, tmp_path)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.images == [str(tmp_path / "a.png")]
    again = parse_record(to_llava(conv), tmp_path)
    assert again.messages == conv.messages and again.images == conv.images
    via_openai = parse_record(to_openai(conv), tmp_path)
    assert via_openai.messages == conv.messages and via_openai.images == conv.images
    # LLaVA without a placeholder: the image goes in front of the first user turn
    bare = parse_record(
        {"image": "a.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        tmp_path,
    )
    assert bare.messages[0]["content"] == "<image>\nHi"
    # OpenAI with a data URL and text-only records
    buf = io.BytesIO()
    picture(30, 30).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rec = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": "A thing."},
        ]
    }
    conv = parse_record(rec)
    assert conv.messages[0]["content"] == "<image>\nWhat?" and conv.images == [buf.getvalue()]
    text = parse_record({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    assert not text.has_images


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})
        + "\n{not json\n"
    )
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: not valid JSON"):
        list(read_records(path))
    with pytest.raises(DataFormatError, match="1 <image> placeholder"):
        parse_record({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]})
    with pytest.raises(DataFormatError, match="no assistant turn"):
        parse_record({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataFormatError, match="remote image URLs"):
        parse_record(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        )


def test_loss_only_on_assistant_content_and_im_end(build_model):
    model, processor = build_model("D")
    conv = Conversation(
        [
            {"role": "system", "content": "Sys."},
            {"role": "user", "content": "<image>\nQ1?"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "second"},
        ],
        [picture(150, 100)],
    )
    enc = processor.encode_segments(chatml_segments(conv), conv.images)
    tok = processor.tokenizer
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tok.decode(trained) == "first answer<|im_end|>second<|im_end|>"
    assert all(lab == -100 for i, lab in zip(enc.input_ids, enc.labels) if i == processor.pad_id)
    assert enc.labels == [i if lab != -100 else -100 for i, lab in zip(enc.input_ids, enc.labels)]


def test_templates_follow_the_paper():
    c = templates.grounded_ocr("x.png", (1000, 500), (743, 310.5, 886, 336), "VINEGAR")
    assert c.messages[0]["content"] == "<image>\nDetect the text within this section: <box>(743,621),(886,672)</box>."
    c = templates.ocr("x.png", (100, 100), [("Herald", (60, 89, 67, 93))])
    assert c.messages[1]["content"] == "<ref>Herald</ref><box>(600,890),(670,930)</box>"
    assert "single word or phrase" in templates.vqa("x.png", "Q?", "A", short=True).messages[0]["content"]
    c = templates.referring("x.png", (1000, 500), "VINEGAR", (743, 310.5, 886, 336))
    assert c.messages[0]["content"].endswith('Identify the text "VINEGAR" in the image and provide the coordinates.')
    assert c.messages[1]["content"] == "<box>(743,621),(886,672)</box>"
    assert templates.latex("x.png", "a^2").messages[0]["content"].endswith("using LaTeX format.")
    assert templates.transcription("x.png", "t").messages[0]["content"].endswith("provided document.")
    assert templates.caption("x.png", "a dog").messages[0]["content"].split("\n")[1] in templates.CAPTION_PROMPTS
    assert templates.box((0, 0, 2000, 10), 1000, 10) == "<box>(0,0),(1000,1000)</box>"  # clamped to 0–1000


def test_blend_is_weighted_deterministic_and_resumable():
    a = Source("a", [Conversation([{"role": "assistant", "content": str(i)}]) for i in range(10)], 3.0)
    b = Source("b", [Conversation([{"role": "assistant", "content": f"b{i}"}]) for i in range(5)], 1.0)
    first = Blend([a, b], seed=1)
    picks = [first.next()[:2] for _ in range(400)]
    share = sum(name == "a" for name, _ in picks) / len(picks)
    assert 0.68 < share < 0.82
    a_items = [i for name, i in picks if name == "a"]
    assert sorted(a_items[:10]) == list(range(10))  # an epoch visits every item once
    second = Blend([a, b], seed=1)
    for _ in range(150):
        second.next()
    state = second.state_dict()
    third = Blend([a, b], seed=1)
    third.load_state_dict(json.loads(json.dumps(state)))
    assert [third.next()[:2] for _ in range(250)] == picks[150:]
    with pytest.raises(ValueError, match="blend changed"):
        Blend([a], seed=1).load_state_dict(state)


def test_too_long_samples_get_fewer_tiles_and_are_dropped_only_when_nothing_fits(build_model):
    model, processor = build_model("D")
    short = Conversation(
        [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "A"}], [picture(56, 56)]
    )
    long = Conversation(
        [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "A"}], [picture(150, 100)]
    )  # 6+1 tiles: 86 tokens; at a budget of 4, 2, 1 tiles: 68, 50, 32 tokens
    essay = Conversation([{"role": "user", "content": "Q? " * 40}, {"role": "assistant", "content": "A"}])
    for max_len, tiles in ((60, 3), (40, 1)):  # the ladder 6 → 4 → 2 → 1 stops at the first budget that fits
        stream = SampleStream(Blend([Source("s", [short, long, essay])], seed=0), processor, max_len)
        got = [stream.next() for _ in range(6)]
        assert all(len(e.input_ids) <= max_len for e in got)
        assert {e.plans[0].num_tiles for e in got} == {1, tiles}  # the long picture is kept, at fewer tiles
        assert stream.counts["degraded"] >= 2 and stream.counts["dropped_too_long"] >= 2  # the essay never fits
        assert stream.counts["used"] == 6 and stream.counts["bad_sample"] == 0


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_packing_equals_unpacked_loss(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    convs = [
        Conversation(
            [
                {"role": "user", "content": "<image>\nWhat color is it?"},
                {"role": "assistant", "content": "red and blue"},
            ],
            [picture(150, 100, 1)],
        ),
        Conversation([{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]),
        Conversation(
            [
                {"role": "user", "content": "<image>\n<image>\nCompare."},
                {"role": "assistant", "content": "the first is larger"},
            ],
            [picture(120, 60, 2), picture(56, 56, 3)],
        ),
    ]
    samples = [processor.encode_segments(chatml_segments(c), c.images) for c in convs]
    tpt = processor.tokens_per_tile
    with torch.no_grad():
        plain = model(**processor.collate(samples, padding_side="right"))
        rows = pack_greedy([len(s.input_ids) for s in samples], max_len=400)
        assert len(rows) == 1  # all three share one row
        packed = model(**collate_packed([[samples[i] for i in r] for r in rows], 0, tpt))
    assert packed.num_tokens == plain.num_tokens
    torch.testing.assert_close(packed.loss, plain.loss, rtol=1e-5, atol=0)
    # and packing really isolates samples: a different neighbour does not change a sample's logits
    with torch.no_grad():
        alone = model(**collate_packed([[samples[0]]], 0, tpt)).logits[0, : len(samples[0].input_ids)]
        with_other = model(**collate_packed([[samples[0], samples[2]]], 0, tpt)).logits[0, : len(samples[0].input_ids)]
    torch.testing.assert_close(alone, with_other, rtol=1e-5, atol=1e-5)


def test_every_recipe_builds_on_meta_with_the_papers_modules():
    from nvlm.models.build import meta_from_dicts
    from nvlm.recipes import RECIPES, get_recipe

    def count(m):
        return sum(p.numel() for p in m.parameters())

    seen = {}
    for name in RECIPES:
        if name.startswith("tiny"):
            continue
        cfg = get_recipe(name)
        key = (cfg.model.arch, cfg.model.llm_config["hidden_size"])
        if key not in seen:  # stage 1 and 2 share the model: build each shape once (meta device, no memory)
            seen[key] = meta_from_dicts(
                cfg.model.arch, cfg.model.llm_config, cfg.model.vision_config, cfg.model.overrides
            )
        m = seen[key]
        assert next(m.parameters()).device.type == "meta"
        if cfg.model.arch == "X":
            assert [tuple(p.shape) for p in m.projector.parameters()][0] == (m.dims.hidden_size, 12800)
        else:
            assert [tuple(p.shape) for p in m.projector.linear_1.parameters()][0][1] == 12800
        if cfg.model.arch != "D":
            assert len(m.xattn) == 10
    d72 = seen[("D", 8192)]
    assert (d72.projector.linear_1.weight.shape, d72.projector.linear_2.weight.shape) == ((29568, 12800), (8192, 29568))
    assert 78.5e9 < count(d72) < 79.5e9  # the released NVLM-D-72B: about 79 B
    assert seen[("X", 8192)].xattn_layers == list(range(0, 80, 8))
    assert seen[("H", 7168)].xattn_layers == list(range(0, 60, 6))
    assert seen[("D", 7168)].projector.linear_1.weight.shape == (20480, 12800)
