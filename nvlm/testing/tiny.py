"""Tiny backbones built from config objects, saved to disk in Hugging Face format.

The tests and the demo build everything locally: they make their own small LLM, vision encoder and tokenizer,
save them as ordinary HF folders, and load them through the same code path a user's real checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]

_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\nWhat is in the image? Describe the picture.<|im_end|>\n<|im_start|>assistant\n",
    "The total is 42. A red circle, a blue square and a green triangle are in the top left corner.",
    "<Image><tile_1><tile_2><tile_3><tile_4><tile_5><tile_6><tile_global_thumbnail></Image>",
    "<tile_x0_y0><tile_x1_y0><box>(0,0),(448,448)</box> 0123456789 + - * / = ?",
    "How many circles are there? Which bar is the tallest? Read the number. yes no left right top bottom",
]


def tiny_tokenizer(vocab_size: int = 512, extra_text: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer with Qwen2's ChatML special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # digits one per token, as Qwen2 does: numbers are then short digit sequences a tiny model can compose
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS + list(extra_text or []), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|vision_pad|>"],
    )


def tiny_llm_config(kind: str = "qwen2", vocab_size: int = 512, hidden: int = 64, layers: int = 4) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    if kind == "qwen2":
        # transformers 5 keeps rope_theta in rope_parameters (a rope_theta= keyword is converted to the same)
        return tf.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if kind == "llama":
        return tf.LlamaConfig(**common)
    raise ValueError(f"tiny LLM kind must be qwen2 or llama, got {kind!r}")


def tiny_vision_config(
    kind: str = "internvl", image_size: int = 56, patch: int = 14, hidden: int = 32, layers: int = 2
) -> Any:
    """A few-layer vision tower: 56 px tiles of 14 px patches → 4×4 patches → 2×2 = 4 tokens after pixel shuffle."""
    import transformers as tf

    common: dict[str, Any] = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2
    )
    if kind == "internvl":  # InternViT-6B style: RMSNorm, QK-norm, no final norm (mean-pooling head unused)
        return tf.InternVLVisionConfig(
            **common,
            image_size=[image_size, image_size],
            patch_size=[patch, patch],
            norm_type="rms_norm",
            use_qk_norm=True,
            use_mean_pooling=True,
        )
    if kind == "siglip":
        return tf.SiglipVisionConfig(**common, image_size=image_size, patch_size=patch)
    if kind == "clip":
        return tf.CLIPVisionConfig(**common, image_size=image_size, patch_size=patch, projection_dim=hidden)
    raise ValueError(f"tiny vision kind must be internvl, siglip or clip, got {kind!r}")


def save_tiny_backbones(
    root: str | Path, llm_kind: str = "qwen2", vision_kind: str = "internvl", seed: int = 0, **llm_kwargs: Any
) -> tuple[Path, Path]:
    """Write a tiny LLM (with its tokenizer) and a tiny vision encoder as HF folders; returns their paths."""
    import torch
    from transformers import AutoModelForCausalLM

    from nvlm.models.saving import no_shard_bars
    from nvlm.vision.encoder import vision_model_from_config

    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    llm = AutoModelForCausalLM.from_config(tiny_llm_config(llm_kind, len(tokenizer), **llm_kwargs))
    llm_dir, vision_dir = root / f"llm-{llm_kind}", root / f"vision-{vision_kind}"
    vcfg = tiny_vision_config(vision_kind)
    with no_shard_bars():
        llm.save_pretrained(llm_dir)
        vision_model_from_config(vision_kind, vcfg.to_dict()).save_pretrained(vision_dir)
    tokenizer.save_pretrained(llm_dir)
    return llm_dir, vision_dir
