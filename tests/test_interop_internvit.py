"""Original InternViT folders (OpenGVLab's remote-code layout: intern_vit_6b, attn.qkv, ls1, norm1 …) with and
without dummy heads, and InternVL chat folders, usable as `vision=` anywhere; remote code never run.

python -m pytest tests/test_interop_internvit.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import picture
from safetensors.torch import load_file, save_file

import nvlm
from nvlm.interop import keymap
from nvlm.loading import load_vision_config, load_vision_model
from nvlm.testing.replica import internvit_replica

KINDS = {"6b": {}, "300m": dict(norm_type="layer_norm", qkv_bias=True, qk_norm=False)}


def _by_hand(folder, prefix=""):
    """transformers' InternVLVisionModel with the folder's weights renamed and split here, literally."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    vc = json.loads((folder / "config.json").read_text())
    vc = vc.get("vision_config", vc)
    w = {k[len(prefix) :]: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(prefix)}
    c, h = vc["hidden_size"], vc["num_attention_heads"]
    hd = c // h
    names = {
        "ls1": "lambda_1",
        "ls2": "lambda_2",
        "norm1.": "layernorm_before.",
        "norm2.": "layernorm_after.",
        "attn.proj.": "attention.projection_layer.",
        "attn.q_norm.": "attention.q_norm.",
        "attn.k_norm.": "attention.k_norm.",
        "mlp.": "mlp.",
    }
    state = {
        "embeddings.cls_token": w.pop("embeddings.class_embedding"),
        "embeddings.position_embeddings": w.pop("embeddings.position_embedding"),
        "embeddings.patch_embeddings.projection.weight": w.pop("embeddings.patch_embedding.weight"),
        "embeddings.patch_embeddings.projection.bias": w.pop("embeddings.patch_embedding.bias"),
    }
    for key, value in w.items():
        layer, inner = key.removeprefix("encoder.layers.").split(".", 1)
        new = f"encoder.layer.{layer}."
        if inner.startswith("attn.qkv."):
            grouped = value.view(3, -1, hd, *value.shape[1:])  # [q|k|v, heads (+ dummies), head_dim, (C)]
            for k, part in enumerate("qkv"):
                state[new + f"attention.{part}_proj.{inner.rsplit('.', 1)[1]}"] = grouped[k, :h].reshape(
                    c, *value.shape[1:]
                )
            continue
        old = next(o for o in names if inner.startswith(o))
        value = value[:c] if "_norm." in inner else value[:, :c] if inner == "attn.proj.weight" else value
        state[new + names[old] + inner[len(old) :]] = value
    model = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=c,
            num_attention_heads=h,
            intermediate_size=vc["intermediate_size"],
            num_hidden_layers=vc["num_hidden_layers"],
            image_size=[vc["image_size"]] * 2,
            patch_size=[vc["patch_size"]] * 2,
            norm_type=vc["norm_type"],
            use_qk_norm=vc["qk_normalization"],
            attention_bias=vc["qkv_bias"],
            layer_norm_eps=vc["layer_norm_eps"],
        )
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dummy", [0, 7])
def test_original_internvit_folder_equals_hand_mapped_transformers_model(tmp_path, kind, dummy):
    folder = internvit_replica(tmp_path / f"vit-{kind}", dummy_heads=dummy, **KINDS[kind])
    ours, family = load_vision_model(folder)
    assert family == "internvl" and type(ours).__name__ == "InternVLVisionModel"
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(
            ours.eval()(pixel_values=pixels).last_hidden_state,
            _by_hand(folder)(pixel_values=pixels).last_hidden_state,
        )
    assert not (folder / "REMOTE_CODE_RAN").exists()
    _, meta_cfg = load_vision_config(folder)  # meta-device builds (dry runs) read the config only
    assert meta_cfg.to_dict() == ours.config.to_dict()


def test_dummy_heads_sliced_equal_the_unpadded_folder(tmp_path):
    padded, _ = load_vision_model(internvit_replica(tmp_path / "padded", dummy_heads=7))
    plain, _ = load_vision_model(internvit_replica(tmp_path / "plain", dummy_heads=0))
    a, b = padded.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_internvl_chat_folder_gives_its_vision_model(tmp_path):
    """A remote-code InternVL chat model (model_type internvl_chat): only its vision_model.* is taken."""
    vit = internvit_replica(tmp_path / "vit")
    chat = tmp_path / "InternVL2-tiny"
    chat.mkdir()
    w = {"vision_model." + k: v for k, v in load_file(vit / "model.safetensors").items()}
    w.update({"mlp1.1.weight": torch.zeros(4, 4), "language_model.model.norm.weight": torch.ones(4)})
    save_file(w, str(chat / "model.safetensors"), metadata={"format": "pt"})
    vc = json.loads((vit / "config.json").read_text())
    (chat / "config.json").write_text(
        json.dumps(
            {
                "model_type": "internvl_chat",
                "vision_config": vc,
                "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            }
        )
    )
    a, _ = load_vision_model(chat)
    b, _ = load_vision_model(vit)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_unknown_vision_weight_is_refused(tmp_path):
    folder = internvit_replica(tmp_path / "vit")
    w = load_file(folder / "model.safetensors")
    w["encoder.layers.0.attn.rotary.weight"] = torch.zeros(2)
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="attn.rotary.weight.*not an InternViT weight"):
        load_vision_model(folder)


@pytest.mark.parametrize("arch", ["D", "H"])
def test_build_with_an_original_internvit_folder_and_reload(backbones, tmp_path, arch):
    folder = internvit_replica(tmp_path / "InternViT-300M-tiny", dummy_heads=0, **KINDS["300m"])
    model, processor = nvlm.build(arch, llm=str(backbones["qwen2"]), vision=str(folder))
    assert model.config.vision.type == "internvl" and model.config.vision.hf_config["norm_type"] == "layer_norm"
    model.save_pretrained(tmp_path / "ckpt")  # our format stores transformers' names in vision/
    processor.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_proc = nvlm.load(tmp_path / "ckpt")
    batch = processor("<image>\nWhat?", [picture(150, 100)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_keymap_vision_names_round_trip(build_model):
    """Every InternVLVisionModel weight has an original name and back (q/k/v → one fused qkv)."""
    names = [k for k in build_model("D")[0].state_dict() if k.startswith("vision.model.")]
    fused = {}
    for name in names:
        m = keymap.ours_to_release(name)
        assert m.name.startswith("vision_model.")
        back = {x.name for x in keymap.release_to_ours(m.name)}
        assert name in back
        fused.setdefault(m.name, set()).add(m.part)
    assert {frozenset(p) for k, p in fused.items() if k.endswith("attn.qkv.weight")} == {frozenset("qkv")}
