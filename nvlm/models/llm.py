"""The backbone LLM and its tokenizer: the model reaches transformers' causal-LM and tokenizer APIs through this
file (``nvlm.interop`` builds the same objects from the NVLM-D-72B release's config; tests and the demo build
tiny ones from config objects).

Any Hugging Face decoder (Qwen2, Llama, Mistral, …) works: NVLM only needs its input embeddings, its list of
decoder layers (to insert gated cross-attention before some of them) and its usual forward with a KV cache.
For the Llama family, a decoding step may also run the decoder's own modules one after the other
(``decode_step``), skipping what the model-level forward does around them. Nothing here runs remote code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from nvlm.config import clean_hf_config

# A Hugging Face causal LM (a transformers PreTrainedModel with an LM head). NVLM uses it duck-typed (its
# config, get_decoder().layers, input/output embeddings, forward with a cache), which nn.Module's typing can't
# express (its __getattr__ gives Tensor | Module), so it is typed Any.
CausalLM: TypeAlias = Any


@dataclass(frozen=True)
class LLMDims:
    """The shapes NVLM's modules take from the LLM."""

    hidden_size: int
    ffn_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    rms_norm_eps: float


def dims_of(config: Any) -> LLMDims:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return LLMDims(
        hidden_size=config.hidden_size,
        ffn_size=config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        num_layers=config.num_hidden_layers,
        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
    )


def load_llm(source: str | os.PathLike | Any, dtype: torch.dtype | None = None) -> CausalLM:
    """A causal LM from a local HF folder, or a randomly initialised one from a config object or dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(source, (str, os.PathLike)):
        if not os.path.isdir(source):
            raise FileNotFoundError(f"LLM {source}: not a folder; give a local Hugging Face model folder")
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    if isinstance(source, dict):
        cfg = dict(source)
        source = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(source, trust_remote_code=False)
    return model.to(dtype) if dtype is not None else model


def load_llm_config(path: str | os.PathLike) -> Any:
    """The LLM's config object from a local HF folder, reading no weights (for meta-device builds)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def decoder_layers(llm: CausalLM) -> nn.ModuleList:
    """The LLM's decoder layers, in order (NVLM-X/H replace each scheduled one with a ``CrossAttentionDecoderLayer``
    wrapping it, which gets the image memory as its ``xattn`` argument)."""
    return llm.get_decoder().layers


def config_dict(llm: CausalLM) -> dict[str, Any]:
    """The LLM's HF config as a plain dict (stored inside NVLM's config.json)."""
    return clean_hf_config(llm.config.to_dict())


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def add_special_tokens(tokenizer: Any, tokens: list[str]) -> int:
    """Register `tokens` as single special tokens (those not already in the vocabulary); returns how many."""
    new = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if not new:
        return 0
    return tokenizer.add_tokens(new, special_tokens=True)


def resize_embeddings(llm: CausalLM, vocab_size: int) -> int | None:
    """Grow the input (and an untied output) embedding to `vocab_size` rows (NVLM's added tokens). Their new
    rows are drawn by ``new_embedding_rows`` from a seed taken off the global random stream, the rest of that
    stream untouched, so a sharded build can draw the same rows without the full matrices. Returns the seed
    (None when nothing grew)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if old >= vocab_size:
        return None
    seed = int(torch.randint(2**62, (), device="cpu").item())  # also inside a meta-device build
    stream = torch.get_rng_state()
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    torch.set_rng_state(stream)  # transformers draws the whole matrix; only the new rows matter (below)
    std = getattr(llm.config.get_text_config(), "initializer_range", 0.02)
    with torch.no_grad():
        for which, weight in enumerate(embedding_weights(llm)):
            if not weight.is_meta:
                weight[old:] = new_embedding_rows(seed, which, vocab_size - old, weight.shape[1], std)
    return seed


def embedding_weights(llm: CausalLM) -> list[nn.Parameter]:
    """The input embedding's weight, then the output embedding's when it is not tied to it."""
    inp, out = llm.get_input_embeddings().weight, llm.get_output_embeddings()
    return [inp] if out is None or out.weight is inp else [inp, out.weight]


def new_embedding_rows(seed: int, which: int, rows: int, width: int, std: float) -> torch.Tensor:
    """The added tokens' rows of embedding `which` (0 input, 1 output), N(0, std) as transformers draws them."""
    gen = torch.Generator().manual_seed(seed + which)
    return torch.empty(rows, width).normal_(0.0, std, generator=gen)


# Decoders whose model-level forward is exactly: inputs_embeds → rotary embedding → every layer with one causal
# mask → final norm (then the LM head). Others (Gemma scales its embeddings, Granite multiplies them, sliding-window
# layers need their own masks, …) always decode through their own forward.
_LAYERWISE_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
_LAYERWISE_ATTENTION = frozenset({"sdpa", "nvlm_packed_sdpa"})  # take a boolean [B, 1, T, T_kv] mask


def layerwise_decode_ok(llm: CausalLM) -> bool:
    """Whether ``decode_step`` computes exactly what ``llm(...)`` computes for this LLM (checked once per model)."""
    c = llm.config
    full = all(t == "full_attention" for t in (getattr(c, "layer_types", None) or ["full_attention"]))
    windowed = c.model_type == "mistral" and getattr(c, "sliding_window", None) is not None
    dec = llm.get_decoder()
    parts = all(hasattr(dec, name) for name in ("rotary_emb", "layers", "norm"))
    return (
        c.model_type in _LAYERWISE_FAMILIES
        and full
        and not windowed
        and parts
        and c._attn_implementation in (_LAYERWISE_ATTENTION | {"eager"})
    )


def decode_step(
    llm: CausalLM,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache: Any,
    logits_to_keep: int = 0,
    **layer_kwargs: Any,
) -> torch.Tensor | None:
    """Logits [B, T, vocab] for `T` new tokens [B, T, d] after the tokens held in `cache`, through the decoder's
    own rotary embedding, layers, norm and LM head called one after the other: the model-level forward's
    wrappers (output capture, keyword merging, mask dispatch) cost about as much as one decoder layer per step
    on a small model. Bitwise the same logits as ``llm(...)``. None (use ``llm(...)``) where the mask would need
    more than SDPA's boolean form: an eager LLM with left padding or several new tokens.

    `attention_mask` [B, past + T] (1 = real token; None = no padding); `position_ids` [B, T]."""
    b, t, _ = inputs_embeds.shape
    mask = None  # one new token per sample and no padding: it attends to every cached key
    if attention_mask is not None or t > 1:
        if llm.config._attn_implementation not in _LAYERWISE_ATTENTION:
            return None
        kv = cache.get_seq_length() + t
        keys = torch.arange(kv, device=inputs_embeds.device)
        causal = keys[None, :] <= (kv - t + torch.arange(t, device=keys.device))[:, None]  # [T, kv]
        mask = causal[None, None].expand(b, 1, t, kv)  # [B, 1, T, kv]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
    dec = llm.get_decoder()
    hidden = inputs_embeds
    rotary = dec.rotary_emb(hidden, position_ids)
    for layer in dec.layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rotary,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **layer_kwargs,
        )
    hidden = dec.norm(hidden)
    return llm.get_output_embeddings()(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
