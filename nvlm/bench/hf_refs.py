"""The transformers models ``nvlm bench … --vs hf`` races ours against, built at equal shapes (references only:
they live here, in the benchmark, never in the model library).

* NVLM-D against ``InternVLForConditionalGeneration``: the same architecture once the projector's hidden width is
  the LLM's (InternVL's) and its biases are zero, so every weight is copied (``nvlm.interop.internvl``) and both
  get the same token ids, pixels and labels; the logits are checked equal before anything is timed.
* NVLM-X against ``MllamaForConditionalGeneration``: both put image tokens in a cross-attention memory read by
  gated blocks (attention + FFN) among the LLM layers. Built from the same widths, depths and heads: Mllama's
  text model gets our LLM layers plus one cross-attention layer where we have a block, its vision tower our
  tower's width and depth (its last layer a "global" one, its output one intermediate layer concatenated, as
  Mllama requires). The architectures share no weights, so both are random. Same token ids, labels and pixels
  (our 6+1 tiles as one 1×7 Mllama image); Mllama has no pixel shuffle, so its memory holds 4× our image
  tokens (plus a class token per tile): equal pixels, not equal memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nvlm.bench.train import Shape, make_batch, synthetic_image
from nvlm.data.chat import chat_prompt

REFERENCES = {"D": "InternVL", "X": "Mllama"}


@dataclass
class Pair:
    """One of our models, its transformers reference, and the inputs each takes for the same samples."""

    arch: str
    reference: str
    ours: Any
    hf: nn.Module
    train: tuple[dict[str, Any], dict[str, Any]]  # (ours, hf) kwargs of one training step, with labels
    memory_tokens: tuple[int, int]  # image tokens each model's cross-attention memory holds per sample
    decoder_tokens: tuple[int, int]  # tokens in each model's decoder sequence per sample
    max_abs_logit_diff: float | None  # D: ours vs InternVL on the same batch (None: different architectures)
    processor: Any = None  # ours's


def build_pair(arch: str, shape: Shape, seed: int = 0) -> Pair:
    import transformers as tf

    import nvlm
    from nvlm.interop.internvl import to_hf_internvl
    from nvlm.testing.tiny import tiny_tokenizer
    from nvlm.training.stages import apply_stage
    from nvlm.vision.encoder import vision_config

    if arch not in REFERENCES:
        raise ValueError(f"no transformers reference for NVLM-{arch}; --vs hf compares {', '.join(REFERENCES)}")
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    llm = tf.Qwen2Config(**{"vocab_size": len(tok), **shape.llm})
    ours, processor = nvlm.build(
        arch,
        llm=llm,
        vision=vision_config("internvl", **shape.vision),
        tokenizer=tok,
        config={
            "tiling.max_tiles": shape.tiles,
            "xattn.every": shape.xattn_every,
            "tags.mode": shape.tag_mode,
            "projector.hidden_size": llm.hidden_size,  # InternVL's projector width (D); X's MLP alike
        },
    )
    apply_stage(ours, "sft")  # LLM, projector (and x-attn) trained; vision frozen; the reference alike below
    image = synthetic_image(shape.tiles, ours.vision.tile_size, seed)
    batch, tokens = make_batch(processor, shape, image)
    if arch == "D":
        hf = to_hf_internvl(ours, ours.config.image_token_id)
        hf_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
        with torch.no_grad():
            diff = (ours(**batch).logits - hf(**hf_batch).logits).abs().max().item()
        pair = Pair(arch, "InternVL", ours, hf, (batch, hf_batch), (0, 0), (tokens.decoder,) * 2, diff, processor)
    else:
        hf = mllama = _mllama(ours, shape)
        hf_batch = mllama_inputs(hf, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        hf_batch["labels"] = batch["labels"]
        n_tiles = batch["pixel_values"].shape[0] // batch["input_ids"].shape[0]
        vit = mllama.config.vision_config
        per_tile = (vit.image_size // vit.patch_size) ** 2 + 1  # patches + a class token per tile
        memory = (tokens.memory, n_tiles * per_tile)
        pair = Pair(arch, "Mllama", ours, hf, (batch, hf_batch), memory, (tokens.decoder,) * 2, None, processor)
    pair.train[1]["use_cache"] = False  # as training scripts set it: no KV cache filled in a training forward
    hf.train()
    hf.requires_grad_(True)
    _vision_of(hf).requires_grad_(False)  # frozen, as ours
    return pair


def generate_inputs(pair: Pair, batch_size: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ours, hf) inputs of `batch_size` copies of one image question, left-padded, without labels."""
    ours = pair.ours
    image = synthetic_image(ours.config.tiling.max_tiles, ours.vision.tile_size, seed)
    enc = pair.processor.encode_segments([(chat_prompt("What is in the image?"), False)], [image])
    batch = pair.processor.collate([enc] * batch_size, padding_side="left")
    if pair.arch == "D":
        return batch, {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    return batch, mllama_inputs(pair.hf, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])


def mllama_inputs(hf: nn.Module, ids: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Our batch as Mllama's inputs: each sample's tiles as one image of 1×n tiles that every token sees."""
    b, t = ids.shape
    n = pixels.shape[0] // b
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels.reshape(b, 1, n, *pixels.shape[1:]),
        "aspect_ratio_ids": torch.ones(b, 1, dtype=torch.long),  # id 1 = the only supported ratio, [1, n]
        "aspect_ratio_mask": torch.ones(b, 1, n, dtype=torch.long),
        "cross_attention_mask": torch.ones(b, t, 1, n, dtype=torch.long),
    }


def reference_compile_targets(hf: nn.Module) -> list[nn.Module]:
    """The reference's counterparts of ``nvlm.distributed.parallel.compile_targets``: each decoder layer (Mllama's
    cross-attention layers included), each vision layer (Mllama's global ones too) and the projector."""
    model: Any = hf.model
    vision: Any = _vision_of(hf)
    if hasattr(vision, "encoder"):  # InternVL's vision tower
        vision_layers = list(vision.encoder.layer)
    else:  # Mllama's: local layers, then global ones
        vision_layers = [*vision.transformer.layers, *vision.global_transformer.layers]
    return [*model.language_model.layers, *vision_layers, model.multi_modal_projector]


def _vision_of(hf: nn.Module) -> nn.Module:
    model: Any = hf.model
    return model.vision_tower if hasattr(model, "vision_tower") else model.vision_model


def _mllama(ours: Any, shape: Shape) -> Any:
    """Mllama with our NVLM-X's widths, depths and cross-attention schedule (random weights)."""
    import transformers as tf

    llm, vit = ours.llm.config, shape.vision
    n_tiles = shape.tiles + (shape.tiles > 1)
    layers = vit["num_hidden_layers"]
    vision = tf.MllamaVisionConfig(
        hidden_size=vit["hidden_size"],
        num_hidden_layers=layers - 1,  # + 1 global layer = our depth
        num_global_layers=1,
        attention_heads=vit["num_attention_heads"],
        intermediate_size=vit["intermediate_size"],
        image_size=vit["image_size"][0],
        patch_size=vit["patch_size"][0],
        max_num_tiles=n_tiles,
        supported_aspect_ratios=[[1, n_tiles]],
        intermediate_layers_indices=[layers - 2],  # Mllama needs at least one
        vision_output_dim=2 * vit["hidden_size"],
    )
    # block i sits before our LLM layer l_i; in Mllama's single layer list that is position l_i + i
    xattn = [layer + i for i, layer in enumerate(ours.xattn_layers)]
    text = tf.MllamaTextConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_hidden_layers + len(xattn),
        cross_attention_layers=xattn,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        intermediate_size=llm.intermediate_size,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=llm.tie_word_embeddings,
        pad_token_id=0,  # Mllama's defaults are Llama-3's ids, outside a small vocabulary
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=ours.config.image_token_id)
    return tf.MllamaForConditionalGeneration(cfg)
