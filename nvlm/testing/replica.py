"""Tiny replicas of the released NVLM-D-72B folder, for tests: random weights in the release's exact layout.

Written from the release's facts directly (literal key names and shapes, as read from the released folder's
config.json, weight index and modeling code), *not* through ``nvlm.interop.keymap``: a replica made by our own
exporter could not catch a mistake the importer shares with it. What is copied from the release: config.json's
structure and quirks (``llm_config.model_type "llama"`` for a Qwen2 LLM, the 4.39-era generation keys, legacy rope
names, ``auto_map``), InternViT's original names with 7 zero dummy heads (qkv rows [q | k | v] each
``(heads + 7) · head_dim``, q/k norms and the output projection's input padded too), ``mlp1.{0,1,3}`` without
linear biases, ``language_model.*``, several shards with an index, a CLIP-style preprocessor_config.json, and
remote-code files that must never run (importing them raises and leaves a marker file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DUMMY_HEADS = 7
REMOTE_CODE = (
    "import pathlib\npathlib.Path(__file__).with_name('REMOTE_CODE_RAN').write_text('yes')\n"
    "raise RuntimeError('the release folder\\'s remote code was imported')\n"
)


# Long on purpose: the release folder written file by file, in the release's own layout and names.
def release_replica(
    root: str | Path,
    *,
    shards: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    vision_layers: int = 2,
    image_size: int = 56,
    patch: int = 14,
    llm_hidden: int = 64,
    llm_ffn: int = 128,
    llm_layers: int = 2,
    dummy_heads: int = DUMMY_HEADS,
    max_tiles: int = 6,
) -> Path:
    """Write a release-layout folder under `root`; returns it. Weights are random (dummy heads zero)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nvlm.testing.tiny import tiny_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tok = tiny_tokenizer()
    tok.save_pretrained(root)
    vocab = len(tok) + 16  # the release's vocab (152064) is larger than its tokenizer (151665)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    c = vision_hidden
    vision: dict[str, Any] = dict(
        hidden=c, heads=vision_heads, layers=vision_layers, image_size=image_size, patch=patch
    )
    w = internvit_weights(rand, dtype, **vision, dummy_heads=dummy_heads, prefix="vision_model.")
    w.update(
        {
            "mlp1.0.weight": 1 + rand(4 * c),
            "mlp1.0.bias": rand(4 * c),
            "mlp1.1.weight": rand(llm_ffn, 4 * c),
            "mlp1.3.weight": rand(llm_hidden, llm_ffn),
        }
    )
    llm_config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=llm_hidden,
        intermediate_size=llm_ffn,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(llm_config).state_dict().items()}
    for k, shape in shapes.items():
        w["language_model." + k] = 1 + rand(*shape) if k.endswith("norm.weight") else rand(*shape)
    _write_shards(root, w, shards, save_file)
    dtype_name = str(dtype).removeprefix("torch.")
    llm = dict(
        vocab=vocab,
        hidden=llm_hidden,
        ffn=llm_ffn,
        layers=llm_layers,
        eos=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    _write_configs(root, llm, internvit_config(**vision, dtype=dtype_name), max_tiles, dtype_name)
    for name in (
        "configuration_nvlm_d.py",
        "modeling_nvlm_d.py",
        "modeling_intern_vit.py",
        "conversation.py",
    ):
        (root / name).write_text(REMOTE_CODE)
    return root


def _write_shards(root: Path, weights: dict[str, torch.Tensor], shards: int, save_file: Any) -> None:
    budget = sum(t.numel() * t.element_size() for t in weights.values()) / shards
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in weights.items():
        if groups[-1] and size >= budget and len(groups) < shards:
            groups.append({})
            size = 0
        groups[-1][k] = t.contiguous()
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


# fmt: off
def _write_configs(root: Path, llm: dict[str, int], vision: dict[str, Any], max_tiles: int, dtype: str) -> None:
    """config.json with the release's structure and 4.39-era llm_config keys, preprocessor and generation configs."""
    image_size, eos = vision["image_size"], llm["eos"]
    llm_config = {
        "_name_or_path": "Qwen/Qwen2-72B-Instruct", "add_cross_attention": False,
        "architectures": ["Qwen2ForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "bos_token_id": 0,
        "do_sample": False, "eos_token_id": eos, "hidden_act": "silu", "hidden_size": llm["hidden"],
        "initializer_range": 0.02, "intermediate_size": llm["ffn"], "max_length": 20, "max_position_embeddings": 4096,
        "mlp_bias": False, "model_type": "llama",  # the release's quirk: a Qwen2 model said to be "llama"
        "num_attention_heads": 4, "num_hidden_layers": llm["layers"], "num_key_value_heads": 2, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": {"factor": 3.0, "type": "dynamic"}, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "top_k": 1, "top_p": 0, "torch_dtype": dtype, "transformers_version": "4.39.3",
        "use_bfloat16": dtype == "bfloat16", "use_cache": True, "vocab_size": llm["vocab"],
    }
    config = {
        "_commit_hash": None, "architectures": ["NVLM_D"],
        "auto_map": {"AutoConfig": "configuration_nvlm_d.NVLM_D_Config", "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
                     "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": image_size, "llm_config": llm_config,
        "max_dynamic_patch": max_tiles, "min_dynamic_patch": 1, "model_type": "NVLM_D", "ps_version": "v2",
        "select_layer": -1, "template": "chatml", "torch_dtype": dtype, "transformers_version": None,
        "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "vision_config": {k: v for k, v in vision.items() if k != "auto_map"},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": image_size}, indent=2))
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": eos}))


def internvit_config(*, hidden: int, heads: int, layers: int, image_size: int, patch: int, dtype: str = "float32",
                     norm_type: str = "rms_norm", qkv_bias: bool = False, qk_norm: bool = True) -> dict[str, Any]:
    """An original InternVisionConfig dict (the release's vision_config; an InternViT folder's config.json)."""
    return {"architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0, "dropout": 0.0,
            "hidden_act": "gelu", "hidden_size": hidden, "image_size": image_size, "initializer_factor": 0.1,
            "initializer_range": 1e-10, "intermediate_size": 4 * hidden, "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_6b", "norm_type": norm_type, "num_attention_heads": heads, "num_channels": 3,
            "num_hidden_layers": layers, "patch_size": patch, "qk_normalization": qk_norm, "qkv_bias": qkv_bias,
            "torch_dtype": dtype, "use_flash_attn": True,
            "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                         "AutoModel": "modeling_intern_vit.InternVisionModel"}}
# fmt: on


def internvit_weights(
    rand: Any,
    dtype: torch.dtype,
    *,
    hidden: int,
    heads: int,
    layers: int,
    image_size: int,
    patch: int,
    dummy_heads: int = 0,
    prefix: str = "",
    norm_type: str = "rms_norm",
    qkv_bias: bool = False,
    qk_norm: bool = True,
) -> dict[str, torch.Tensor]:
    """Random original-InternViT weights (literal names), `dummy_heads` zero heads padded as the release does.
    The real heads' values are drawn the same way whatever `dummy_heads` is (same seed → same real weights)."""
    c, h, hd, grid = hidden, heads, hidden // heads, image_size // patch
    total = (h + dummy_heads) * hd  # padded width of q (and of k, v)

    def padded(real: torch.Tensor, dim: int) -> torch.Tensor:  # zero dummy entries after the real ones
        shape = list(real.shape)
        shape[dim] = total - real.shape[dim]
        return torch.cat([real, torch.zeros(shape, dtype=dtype)], dim)

    w = {
        "embeddings.class_embedding": rand(1, 1, c),
        "embeddings.position_embedding": rand(1, grid * grid + 1, c),
        "embeddings.patch_embedding.weight": rand(c, 3, patch, patch),
        "embeddings.patch_embedding.bias": rand(c),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        qkv = torch.stack([padded(rand(h * hd, c), 0) for _ in range(3)])  # [q | k | v], each padded
        w.update(
            {
                p + "attn.qkv.weight": qkv.reshape(3 * total, c),
                p + "attn.proj.weight": padded(rand(c, h * hd), 1),
                p + "attn.proj.bias": rand(c),
                p + "ls1": rand(c, scale=0.5),
                p + "ls2": rand(c, scale=0.5),
                p + "mlp.fc1.weight": rand(4 * c, c),
                p + "mlp.fc1.bias": rand(4 * c),
                p + "mlp.fc2.weight": rand(c, 4 * c),
                p + "mlp.fc2.bias": rand(c),
            }
        )
        for norm in ("norm1", "norm2"):
            w[p + norm + ".weight"] = 1 + rand(c)
            if norm_type == "layer_norm":
                w[p + norm + ".bias"] = rand(c)
        if qkv_bias:
            w[p + "attn.qkv.bias"] = torch.stack([padded(rand(h * hd), 0) for _ in range(3)]).reshape(-1)
        if qk_norm:
            w[p + "attn.q_norm.weight"] = padded(1 + rand(h * hd), 0)
            w[p + "attn.k_norm.weight"] = padded(1 + rand(h * hd), 0)
    return {prefix + k: v for k, v in w.items()}


def internvit_replica(
    root: str | Path,
    *,
    seed: int = 0,
    dummy_heads: int = 0,
    hidden: int = 32,
    heads: int = 2,
    layers: int = 2,
    image_size: int = 56,
    patch: int = 14,
    **kind: Any,
) -> Path:
    """A standalone original InternViT folder (OpenGVLab layout, remote code that must never run). `kind`:
    norm_type="layer_norm", qkv_bias=True, qk_norm=False for the InternViT-300M family."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    shape: dict[str, Any] = dict(hidden=hidden, heads=heads, layers=layers, image_size=image_size, patch=patch)
    save_file(
        internvit_weights(rand, torch.float32, **shape, dummy_heads=dummy_heads, **kind),
        str(root / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (root / "config.json").write_text(json.dumps(internvit_config(**shape, **kind), indent=2))
    for name in ("configuration_intern_vit.py", "modeling_intern_vit.py"):
        (root / name).write_text(REMOTE_CODE)
    return root
