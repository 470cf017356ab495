"""NVLM-D without tile tags is transformers' InternVL: at equal weights (``nvlm.interop.internvl.to_hf_internvl``)
NVLM-D (tags.style="none") and ``InternVLForConditionalGeneration`` give identical logits and greedy answers.

The two differ only where InternVL's projector has linear biases and a hidden width equal to the LLM's (NVLM-D:
no biases, width = FFN size by default): the NVLM-D here takes the LLM's width and the biases are zero.

python -m pytest tests/test_parity_internvl.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture

import nvlm
from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids
from nvlm.interop.internvl import to_hf_internvl
from nvlm.interop.keymap import hf_internvl_to_ours, ours_to_hf_internvl


@pytest.fixture(scope="module")
def pair(backbones):
    torch.manual_seed(0)
    ours, ours_proc = nvlm.build(
        "D",
        llm=str(backbones["qwen2"]),
        vision=str(backbones["internvl"]),
        tags__style="none",
        projector__hidden_size=64,  # the tiny LLM's width, as InternVL's projector
    )
    ours.eval()
    with torch.no_grad():  # a trained-looking projector (LayerNorm not at its 1/0 init)
        for p in ours.projector.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p is ours.projector.layer_norm.weight else 0))
    hf = to_hf_internvl(ours, ours.config.image_token_id).eval()  # raises unless only its projector biases are left
    return ours, hf, ours_proc


def test_keymap_covers_both_state_dicts(pair, tmp_path):
    ours, hf, ours_proc = pair
    names = set(ours.state_dict())
    assert {ours_to_hf_internvl(k) for k in names} | {
        "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.bias",
    } == set(hf.state_dict())
    assert all(hf_internvl_to_ours(ours_to_hf_internvl(k)) == k for k in names)
    hf.save_pretrained(tmp_path / "hf")  # the names transformers writes to disk
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert {ours_to_hf_internvl(k, on_disk=True) for k in names} <= on_disk
    assert {
        hf_internvl_to_ours(k, on_disk=True) for k in on_disk if not k.endswith(("linear_1.bias", "linear_2.bias"))
    } == names


@pytest.mark.parametrize("size", [(150, 100), (56, 56)])
def test_identical_logits(pair, size):
    ours, hf, ours_proc = pair
    batch = ours_proc(chat_prompt("What is in the image?", 1), [picture(*size)])
    with torch.no_grad():
        a = ours(**batch).logits
        b = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    assert torch.equal(a, b)


def test_identical_greedy_generation(pair):
    ours, hf, ours_proc = pair
    batch = ours_proc(chat_prompt("Describe the picture.", 1), [picture(150, 100, 2)])
    eos = ours_proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    mine = torch.stack(list(generate_ids(ours, batch, 12, eos_token_ids=[eos])), 1)
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            suppress_tokens=[ours_proc.pad_id],
        )
    theirs = theirs[:, batch["input_ids"].shape[1] :]
    assert mine.shape[1] >= 2 and torch.equal(mine, theirs)
