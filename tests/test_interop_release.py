"""Loading the released NVLM-D-72B layout directly: tiny replicas (random weights, the release's names, config
quirks, 7 zero dummy heads, several shards) checked against transformers models assembled by hand.

python -m pytest tests/test_interop_release.py -q
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import picture
from safetensors.torch import load_file, save_file

import nvlm
from nvlm.data.chat import chat_prompt
from nvlm.testing.replica import release_replica


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return release_replica(tmp_path_factory.mktemp("release") / "NVLM-D-tiny", shards=4)


def _release_weights(root):
    index = json.loads((root / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(root / file))  # the safetensors library, not our reader
    return out


def _by_hand(root):
    """The release's weights in transformers' InternVLVisionModel + Qwen2ForCausalLM, sliced here by the release
    rule (qkv viewed as [3, heads + 7, head_dim, C]; norms and proj columns cut to the real width), and the mlp1
    tensors: written independently of nvlm.interop."""
    from transformers import InternVLVisionConfig, InternVLVisionModel, Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((root / "config.json").read_text())
    vc, w = cfg["vision_config"], _release_weights(root)
    c, h = vc["hidden_size"], vc["num_attention_heads"]
    hd = c // h
    vis = {
        "embeddings.cls_token": w["vision_model.embeddings.class_embedding"],
        "embeddings.position_embeddings": w["vision_model.embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": w["vision_model.embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": w["vision_model.embeddings.patch_embedding.bias"],
    }
    for i in range(vc["num_hidden_layers"]):
        o, n = f"vision_model.encoder.layers.{i}.", f"encoder.layer.{i}."
        qkv = w[o + "attn.qkv.weight"].view(3, -1, hd, c)
        for k, name in enumerate("qkv"):
            vis[n + f"attention.{name}_proj.weight"] = qkv[k, :h].reshape(c, c)
        vis[n + "attention.q_norm.weight"] = w[o + "attn.q_norm.weight"][:c]
        vis[n + "attention.k_norm.weight"] = w[o + "attn.k_norm.weight"][:c]
        vis[n + "attention.projection_layer.weight"] = w[o + "attn.proj.weight"][:, :c]
        vis[n + "attention.projection_layer.bias"] = w[o + "attn.proj.bias"]
        vis[n + "lambda_1"], vis[n + "lambda_2"] = w[o + "ls1"], w[o + "ls2"]
        vis[n + "layernorm_before.weight"], vis[n + "layernorm_after.weight"] = (
            w[o + "norm1.weight"],
            w[o + "norm2.weight"],
        )
        for fc in ("fc1", "fc2"):
            for p in ("weight", "bias"):
                vis[n + f"mlp.{fc}.{p}"] = w[o + f"mlp.{fc}.{p}"]
    vision = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=c,
            num_attention_heads=h,
            intermediate_size=vc["intermediate_size"],
            num_hidden_layers=vc["num_hidden_layers"],
            image_size=[vc["image_size"]] * 2,
            patch_size=[vc["patch_size"]] * 2,
            norm_type="rms_norm",
            use_qk_norm=True,
            attention_bias=False,
            layer_norm_eps=1e-6,
        )
    )
    vision.load_state_dict(vis, strict=True)
    lc = {
        k: v
        for k, v in cfg["llm_config"].items()
        if k
        in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "tie_word_embeddings",
        )
    }
    llm = Qwen2ForCausalLM(Qwen2Config(**lc))
    llm.load_state_dict(
        {k[len("language_model.") :]: v for k, v in w.items() if k.startswith("language_model.")}, strict=True
    )
    mlp1 = {k: v for k, v in w.items() if k.startswith("mlp1.")}
    return vision.eval(), llm.eval(), mlp1


def _reference_logits(vision, llm, mlp1, batch, pad_id):
    with torch.no_grad():
        feats = vision(pixel_values=batch["pixel_values"]).last_hidden_state[:, 1:]  # CLS dropped
        n, p, c = feats.shape
        g = int(p**0.5)
        # pixel shuffle v2: token (i, j) = patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1), concatenated
        x = feats.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * c)
        x = F.layer_norm(x, (4 * c,), mlp1["mlp1.0.weight"], mlp1["mlp1.0.bias"], eps=1e-5)
        x = F.linear(F.gelu(F.linear(x, mlp1["mlp1.1.weight"])), mlp1["mlp1.3.weight"])
        ids = batch["input_ids"]
        embeds = llm.get_input_embeddings()(ids)
        embeds[ids == pad_id] = x.reshape(-1, x.shape[-1])
        return llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


def test_loaded_release_equals_transformers_models_assembled_by_hand(replica):
    model, processor = nvlm.load(replica)
    assert model.config.arch == "D" and model.config.template == "release"
    assert (model.config.tags.style, model.config.tags.mode) == ("1d", "text")
    assert model.vision.model.config.num_attention_heads == 2  # the real heads; the 7 dummies are gone
    batch = processor(chat_prompt("What is shown?", 1, template="release"), [picture(150, 100)])
    assert batch["pixel_values"].shape[0] > 1  # several tiles and a thumbnail went through
    with torch.no_grad():
        ours = model(**batch).logits
    reference = _reference_logits(*_by_hand(replica), batch, processor.pad_id)
    assert torch.equal(ours, reference)


def test_config_quirks_mapped(replica):
    model, processor = nvlm.load(replica)
    cfg = model.config
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"  # from architectures[0], not model_type "llama"
    rope = model.llm.config.rope_parameters
    assert rope["rope_theta"] == 1e6 and rope["factor"] == 3.0 and rope["rope_type"] == "dynamic"
    assert (cfg.tiling.min_tiles, cfg.tiling.max_tiles, cfg.tiling.use_thumbnail) == (1, 6, True)
    assert cfg.vision.image_mean == (0.485, 0.456, 0.406) and cfg.vision.select_layer == -1
    assert model.projector.linear_1.weight.shape == (128, 128)  # hidden width = the LLM's FFN size
    assert model.llm.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) + 16  # no resize, no new tokens


def test_sliced_heads_equal_an_unpadded_tower_exactly(tmp_path):
    padded, padded_proc = nvlm.load(release_replica(tmp_path / "padded", dummy_heads=7))
    plain, plain_proc = nvlm.load(release_replica(tmp_path / "plain", dummy_heads=0))
    a, b = padded.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = padded_proc(chat_prompt("Hi", 1, template="release"), [picture(100, 100)])
    with torch.no_grad():
        assert torch.equal(padded(**batch).logits, plain(**batch).logits)


def test_padded_attention_by_the_release_rule_equals_the_sliced_attention(replica):
    """The release's padded attention, computed here from the padded weights (32-head layout, q/k RMSNorm variance
    over the real channels only), equals our sliced InternVLVisionModel attention."""
    model, processor = nvlm.load(replica)
    w = _release_weights(replica)
    c, h = 32, 2
    hd = c // h
    x = torch.randn(3, 17, c)
    qkv = x @ w["vision_model.encoder.layers.0.attn.qkv.weight"].T  # [B, N, 3 * (h + 7) * hd]
    q, k, v = qkv.view(3, 17, 3, -1, hd).unbind(2)  # [B, N, heads + dummy, hd]

    def norm(t, weight):  # RMSNorm over the padded width, variance over the first c channels (release)
        flat = t.reshape(3, 17, -1)
        var = flat[..., :c].pow(2).mean(-1, keepdim=True)
        return (flat * torch.rsqrt(var + 1e-6) * weight).view_as(t)

    q, k = (
        norm(q, w["vision_model.encoder.layers.0.attn.q_norm.weight"]),
        norm(k, w["vision_model.encoder.layers.0.attn.k_norm.weight"]),
    )
    att = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * hd**-0.5, -1) @ v.transpose(1, 2)
    padded_out = F.linear(
        att.transpose(1, 2).reshape(3, 17, -1),
        w["vision_model.encoder.layers.0.attn.proj.weight"],
        w["vision_model.encoder.layers.0.attn.proj.bias"],
    )
    with torch.no_grad():
        ours = model.vision.model.encoder.layer[0].attention(x)[0]
    assert torch.allclose(ours, padded_out, atol=1e-6, rtol=1e-5)  # different op order: float rounding only


def test_remote_code_is_never_imported(replica):
    cfg = json.loads((replica / "config.json").read_text())
    assert "auto_map" in cfg and (replica / "modeling_nvlm_d.py").is_file()
    model, processor = nvlm.load(replica)
    assert model is not None
    assert not (replica / "REMOTE_CODE_RAN").exists()
    assert not [m for m in sys.modules if "nvlm_d" in m or "intern_vit" in m]


def test_nonzero_dummy_heads_are_reported(tmp_path):
    root = release_replica(tmp_path / "r", shards=1)
    shard = next(root.glob("model-*.safetensors"))
    w = load_file(shard)
    w["vision_model.encoder.layers.0.attn.proj.weight"][:, -1] = 0.5  # a dummy column that is not zero
    save_file(w, str(shard), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="dummy-head entries are not all zero"):
        nvlm.from_pretrained(root)


@pytest.mark.parametrize("size", [(150, 100), (56, 56)])
def test_release_template_gives_the_release_input_ids(replica, size):
    """release chat(): system 'Answer the questions.', no newline after <|im_end|>, '<image>\\n' before the
    question, tags <tile_1>… then <tile_global_thumbnail> (alone for one tile), the whole query tokenized at once."""
    model, processor = nvlm.load(replica)
    question = "What is the total? Answer: 42."
    batch = processor(chat_prompt(question, 1, template="release"), [picture(*size)])
    n = batch["pixel_values"].shape[0]
    tags = [f"<tile_{i}>" for i in range(1, n)] + ["<tile_global_thumbnail>"]
    image = "<Image>" + "".join(t + "<|vision_pad|>" * processor.tokens_per_tile for t in tags) + "</Image>"
    query = (
        f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{image}\n{question}<|im_end|>"
        "<|im_start|>assistant\n"
    )
    want = processor.tokenizer(query)["input_ids"]
    assert batch["input_ids"][0].tolist() == want
    assert (n == 1) == (size == (56, 56))
    chatml = processor(chat_prompt(question, 1), [picture(*size)])["input_ids"][0].tolist()
    assert chatml != want  # Megatron's ChatML: newlines, no system, tags tokenized piece by piece


def test_chat_uses_the_model_template(replica, monkeypatch):
    import nvlm.inference.generate as gen

    seen = []
    monkeypatch.setattr(gen, "generate", lambda model, processor, prompt, images, **kw: seen.append(prompt) or "")
    model, processor = nvlm.load(replica)
    model.chat(processor, "Q?", image=picture(56, 56))
    assert seen == [
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ?<|im_end|>"
        "<|im_start|>assistant\n"
    ]


def test_bf16_and_dtype(tmp_path):
    root = release_replica(tmp_path / "bf16", dtype=torch.bfloat16)
    model, processor = nvlm.load(root)
    assert model.llm.dtype == torch.bfloat16 and model.vision.model.embeddings.cls_token.dtype == torch.bfloat16
    assert model.projector.linear_1.weight.dtype == torch.float32  # as nvlm.from_pretrained on our format
    assert (
        model.llm.model.rotary_emb.inv_freq.dtype == torch.float32 and not model.llm.model.rotary_emb.inv_freq.is_meta
    )
    cast, cast_proc = nvlm.load(root, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in cast.parameters())
    assert not any(p.is_meta for p in cast.parameters()) and not any(b.is_meta for b in cast.buffers())
