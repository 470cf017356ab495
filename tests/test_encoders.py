"""Vision encoders through transformers: InternViT, SigLIP, CLIP; CLS dropped; layer selection.

python -m pytest tests/test_encoders.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture

from nvlm.data.chat import chat_prompt
from nvlm.vision.encoder import VisionEncoder, load_vision_model


@pytest.mark.parametrize("kind", ["internvl", "siglip", "clip"])
def test_encoder_shapes_and_cls(backbones, kind):
    model, got = load_vision_model(str(backbones[kind]))
    assert got == kind
    enc = VisionEncoder(model, kind).eval()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        out = enc(x)
        raw = model(pixel_values=x).last_hidden_state
    assert out.shape == (3, 4, 4 * 32)  # 4×4 patches → 2×2 tokens of 4× width
    assert raw.shape[1] == 16 + (1 if kind != "siglip" else 0)  # CLS present only for InternViT / CLIP
    first = raw[:, 1:] if kind != "siglip" else raw  # token (0,0) = patches (0,0),(0,1),(1,0),(1,1)
    assert torch.equal(out[:, 0, :32], first[:, 0]) and torch.equal(out[:, 0, 32:64], first[:, 1])
    assert torch.equal(out[:, 0, 64:96], first[:, 4]) and torch.equal(out[:, 0, 96:], first[:, 5])


def test_select_layer(backbones):
    model, kind = load_vision_model(str(backbones["internvl"]))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
        out = VisionEncoder(model, kind, select_layer=-2).eval()(x)
    assert torch.equal(out[0, 0, :32], hidden[-2][0, 1])


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_models_over_other_encoders(build_model, vision):
    model = build_model("D", llm="llama" if vision == "siglip" else "qwen2", vision=vision)
    assert not any(p.requires_grad for p in model.vision.parameters())  # frozen by default
    out = model(**model.processor(chat_prompt("Describe.", 1), [picture(120, 60)]))
    assert torch.isfinite(out.logits).all()


def test_unsupported_encoder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "dinov2"}')  # a model type no loader reads
    with pytest.raises(ValueError, match="not supported"):
        load_vision_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vision_model(str(tmp_path / "missing"))
