"""Invariants of NVLM-D/X/H over tiny Qwen2 and Llama backbones loaded from disk.

python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.models.xattn import GatedCrossAttentionBlock, schedule, xattn_mask


def _backbone_logits(model, batch, embeds=None):
    with torch.no_grad():
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if embeds is None:
            return model.llm(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos
            ).logits
        return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=pos).logits


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
@pytest.mark.parametrize("arch", ["X", "H"])
def test_zero_gates_equal_backbone_exactly(build_model, arch, llm):
    model, processor = build_model(arch, llm=llm, vision="internvl" if llm == "qwen2" else "siglip")
    text_only = processor(chat_prompt("What is 3+4?", 0))
    with_image = processor(chat_prompt("Describe it.", 1), [picture(150, 100)])
    with torch.no_grad():
        for batch in (text_only, with_image):
            logits = model(**batch).logits
            embeds, state, _ = model.embed(
                batch["input_ids"],
                batch["pixel_values"],
                batch["decoder_tiles"],
                batch["memory_index"],
                batch["memory_tag_ids"],
            )
            assert torch.equal(logits, _backbone_logits(model, batch, embeds))
        assert state is not None and state.memory.shape[1] > 0  # the image really went through x-attn


def test_zero_gates_x_with_image_equals_plain_backbone_on_ids(build_model):
    model, processor = build_model("X")
    batch = processor(chat_prompt("Describe it.", 2), [picture(150, 100), picture(50, 50, 1)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _backbone_logits(model, batch))


@pytest.mark.parametrize("arch", ["X", "H"])
def test_bf16_llm_with_fp32_blocks_zero_gates_equal_backbone(backbones, tmp_path, arch):
    """A bf16 checkpoint (as released LLMs are) keeps its dtype; NVLM's own blocks stay fp32 and cast at
    their boundary, so with zero gates the logits are still exactly the bf16 backbone's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nvlm

    folder = tmp_path / "llm-bf16"
    AutoModelForCausalLM.from_pretrained(backbones["qwen2"]).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbones["qwen2"]).save_pretrained(folder)
    model, processor = nvlm.build(arch, llm=str(folder), vision=str(backbones["internvl"]))
    assert model.llm.dtype == torch.bfloat16 and model.xattn[0].q_proj.weight.dtype == torch.float32
    batch = processor(chat_prompt("Describe it.", 1), [picture(150, 100)])
    with torch.no_grad():
        logits = model(**batch).logits
        embeds, _, _ = model.embed(batch["input_ids"], batch["pixel_values"], batch["decoder_tiles"])
        assert torch.equal(logits, _backbone_logits(model, batch, embeds))


def test_d_without_image_equals_backbone(build_model):
    model, processor = build_model("D", llm="llama", vision="siglip")
    batch = processor(chat_prompt("What is 3+4?", 0))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _backbone_logits(model, batch))


@pytest.mark.parametrize("arch", ["X", "H"])
def test_open_gates_change_only_rows_that_see_an_image(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.7)
    # text before the image sees nothing: its row is zeroed, never NaN
    batch = processor("Look at this: <image>\nWhat is it?", [picture(150, 100)])
    with torch.no_grad():
        logits = model(**batch).logits
        base = _backbone_logits(
            model, batch, model.embed(batch["input_ids"], batch["pixel_values"], batch["decoder_tiles"], None)[0]
        )
    assert torch.isfinite(logits).all()
    blind = (batch["xattn_hi"][0] == 0).nonzero().flatten()  # tokens before any image (and no tag)
    sees = (batch["xattn_hi"][0] > batch["xattn_lo"][0]).nonzero().flatten()
    assert len(blind) > 0 and len(sees) > 0
    assert torch.equal(logits[0, blind], base[0, blind])
    assert not torch.allclose(logits[0, sees[-1]], base[0, sees[-1]])
    model.gate_off = True  # text-only switch: blocks skipped entirely
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)


def test_tag_row_sees_only_its_tile(build_model):
    model, processor = build_model("X")
    tpt = model.vision.tokens_per_tile
    enc = processor.encode(chat_prompt("Describe it.", 1), [picture(150, 100)])  # 3×2 grid + thumbnail
    assert enc.plans[0].num_tiles == 7 and enc.memory_len == 7 * tpt
    ids = enc.input_ids
    for k in range(6):
        tag_ids = processor.tokens(f"<tile_{k + 1}>")
        start = next(i for i in range(len(ids)) if ids[i : i + len(tag_ids)] == tag_ids)
        for t in range(start, start + len(tag_ids)):
            assert (enc.xattn_lo[t], enc.xattn_hi[t]) == (k * tpt, (k + 1) * tpt)
    # functional check on one block: changing other tiles' memory leaves the tag row unchanged
    block = GatedCrossAttentionBlock(model.dims).eval()
    set_gates(type("M", (), {"xattn": [block]})(), 0.5)
    lo, hi = torch.tensor([enc.xattn_lo]), torch.tensor([enc.xattn_hi])
    x = torch.randn(1, len(ids), model.dims.hidden_size)
    memory = torch.randn(1, enc.memory_len, model.dims.hidden_size)
    allowed, row = xattn_mask(lo, hi, enc.memory_len)
    out1 = block(x, memory, allowed, row)[0]
    memory2 = memory.clone()
    memory2[:, 2 * tpt :] += 1.0  # perturb tiles 3..7
    out2 = block(x, memory2, allowed, row)[0]
    tag2 = [t for t in range(len(ids)) if (enc.xattn_lo[t], enc.xattn_hi[t]) == (tpt, 2 * tpt)]
    assert tag2 and torch.equal(out1[0, tag2], out2[0, tag2])
    after = len(ids) - 1  # the last token sees the whole image
    assert not torch.allclose(out1[0, after], out2[0, after])


def test_block_rows_that_see_nothing_are_identity_and_finite():
    from nvlm.models.llm import LLMDims

    dims = LLMDims(
        hidden_size=16, ffn_size=32, num_heads=4, num_kv_heads=2, head_dim=4, num_layers=2, rms_norm_eps=1e-6
    )
    block = GatedCrossAttentionBlock(dims)
    with torch.no_grad():
        block.gate_attn.fill_(1.0)
        block.gate_ffn.fill_(1.0)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    lo = torch.zeros(2, 5, dtype=torch.long)
    hi = torch.tensor([[0, 0, 6, 6, 6], [0, 0, 0, 0, 0]])
    allowed, row = xattn_mask(lo, hi, 6)
    out = block(x, memory, allowed, row)[0]
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], x[0, :2]) and torch.equal(out[1], x[1])
    assert not torch.allclose(out[0, 2:], x[0, 2:])


def test_placeholder_mismatch_is_a_clear_error(build_model):
    model, processor = build_model("D")
    batch = processor(chat_prompt("Describe it.", 1), [picture(120, 60)])
    pad = processor.pad_id
    ids = batch["input_ids"].clone()
    first = (ids[0] == pad).nonzero()[0, 0]
    ids[0, first] = 0
    with pytest.raises(ValueError, match=r"disagree: 11 .* 3 decoder tile\(s\) × 4 = 12"):
        model(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        processor.encode("<image><image> two?", [picture(50, 50)])
    with pytest.raises(ValueError, match="image-pad token"):
        processor.encode("sneaky <|vision_pad|>", [])


def test_mixed_batch_logits_equal_one_by_one(build_model):
    """Left-padded batch of text-only and 1–3 images with different tile counts == samples one at a time."""
    for arch in ("D", "X", "H"):
        model, processor = build_model(arch)
        set_gates(model, 0.4)
        texts = [
            chat_prompt("What is 2+2?", 0),
            chat_prompt("Describe.", 1),
            chat_prompt("Compare them all, please.", 3),
            chat_prompt("Two?", 2),
        ]
        images = [
            [],
            [picture(150, 100)],
            [picture(50, 50), picture(120, 60, 1), picture(60, 200, 2)],
            [picture(100, 100, 3), picture(56, 56, 4)],
        ]
        batch = processor(texts, images)
        with torch.no_grad():
            logits = model(**batch).logits
            for i, (t, im) in enumerate(zip(texts, images)):
                single = model(**processor(t, im)).logits[0]
                n = single.shape[0]
                torch.testing.assert_close(logits[i, -n:], single, rtol=1e-4, atol=1e-5)


def test_schedule():
    assert schedule(80, None, None) == list(range(0, 80, 8)) and len(schedule(80, None, None)) == 10
    assert len(schedule(60, None, None)) == 10 and schedule(60, None, None)[1] == 6
    assert schedule(4, 2, None) == [0, 2]
    assert schedule(4, None, [3, 1]) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        schedule(4, None, [4])


def test_xattn_every_is_configurable_and_reported(build_model):
    model, processor = build_model("H", xattn__every=2)
    assert model.xattn_layers == [0, 2] and len(model.xattn) == 2
    assert "2 blocks, before LLM layers [0, 2]" in model.describe()
    assert len(build_model("D")[0].xattn) == 0


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_a_touched_batch_runs_every_module_without_changing_the_result(build_model, arch):
    """Sharded training runs the vision tower, projector and each x-attn block on every process, even for a
    text-only batch (the trainer adds a blank tile and a memory no row sees): the logits stay bit-identical,
    and the modules get (zero) gradients, so every process takes part in the same collectives."""
    from nvlm.training.micro_batch import touch_every_module, with_unused

    model, processor = build_model(arch)
    set_gates(model, 0.5)
    model.vision.requires_grad_(True)
    batch = processor(chat_prompt("What is 3+4?", 0))
    plain = model(**batch).logits
    called = []
    hooks = [
        m.register_forward_hook(lambda *a, n=n: called.append(n))
        for n, m in [
            ("vision", model.vision),
            ("projector", model.projector),
            *[(f"xattn.{i}", b) for i, b in enumerate(model.xattn)],
        ]
    ]
    out = model(**touch_every_module(batch, model))
    for h in hooks:
        h.remove()
    assert torch.equal(out.logits, plain)
    assert set(called) == {"vision", "projector", *[f"xattn.{i}" for i in range(len(model.xattn))]}
    with_unused(out.logits.sum(), out).backward()  # as the trainer's loss
    for name, p in [
        *model.vision.named_parameters(),
        *model.projector.named_parameters(),
        *model.xattn.named_parameters(),
    ]:
        assert p.grad is not None and not p.grad.any(), name
