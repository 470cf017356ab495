"""The NVLM model: vision encoder → projector → LLM, for the three architectures of paper §4.2–4.4.

One class serves D, X and H because they differ only in *where* each tile's tokens go, which the prompt
layout decides (``nvlm.data.layout``): NVLM-D scatters all tile features into the decoder's image-pad slots;
NVLM-X puts them all in the cross-attention memory; NVLM-H puts the thumbnail in the decoder and the regular
tiles (with their tags' text embeddings) in the memory. X and H put a gated cross-attention block
(``nvlm.models.xattn``) before scheduled LLM layers: each such layer is replaced in the LLM's layer list by a
``CrossAttentionDecoderLayer`` that visibly runs block → layer, and the image memory with its masks is passed
down to it as the ``xattn`` argument of the LLM's forward. The backbone's own modules, masks, RoPE and KV cache
stay those of the Hugging Face model.

The model knows nothing of data loading, distribution or logging, and holds no tokenizer: its inputs come from
the processor that ``nvlm.load`` (or ``nvlm.build``) returns beside it (``nvlm.data.processor``); the one token
id it must know, the image-pad token's, is in its config.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvlm.config import NVLMConfig
from nvlm.models.llm import CausalLM, LLMDims, decode_step, decoder_layers, dims_of, layerwise_decode_ok
from nvlm.models.packed_attention import packed_kwargs
from nvlm.models.saving import save_pretrained
from nvlm.models.xattn import (
    CrossAttentionDecoderLayer,
    GatedCrossAttentionBlock,
    XAttnInputs,
    XAttnState,
    schedule,
    xattn_mask,
)
from nvlm.vision.encoder import VisionEncoder, VisionTower
from nvlm.vision.projector import build_projector
from nvlm.vision.resampler import PerceiverResampler


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, vocab] (the last positions with logits_to_keep; None: loss only)
    past_key_values: Any = None
    xattn_state: XAttnState | None = None
    loss_sum: torch.Tensor | None = None  # with labels: summed token cross-entropy …
    num_tokens: int = 0  # … over this many labelled tokens
    # features of given tiles that neither the decoder nor the memory used (a sharded run's stand-in tile, see
    # ``nvlm.training.micro_batch.touch_every_module``): the trainer adds them times zero to the loss
    unused_features: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor | None:
        return None if self.loss_sum is None else self.loss_sum / max(self.num_tokens, 1)


@dataclass
class LabelRows:
    """Where the loss is taken: the rows of the flattened [B·T] hidden states whose next token carries a label,
    those labels, and their count (``label_rows``)."""

    index: torch.Tensor  # [N] long
    targets: torch.Tensor  # [N] long, in the rows' order
    count: int


def label_rows(labels: torch.Tensor) -> LabelRows:
    """`labels` [B, T] (-100: no loss) → ``LabelRows``, computed where the labels are. The trainer calls it on the
    host before the forward: under FSDP the labels handed to the model arrive on the GPU (its root moves every
    input there), where ``nonzero`` would stall the host once per micro-batch; a dataclass's tensors are moved
    too, its count is not."""
    b, t = labels.shape
    keep = torch.zeros(b, t, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != -100  # position i is kept when token i+1 is labelled
    index = keep.reshape(-1).nonzero().squeeze(1)  # [N] rows of the flattened [B·T, d] states
    targets = labels[:, 1:][keep[:, :-1]]  # [N]
    return LabelRows(index, targets, int(targets.numel()))


def labelled_loss(
    hidden: torch.Tensor, labels: torch.Tensor | LabelRows, head: nn.Module, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, int]:
    """``NVLM.loss`` computed from the final hidden states [B, T, d], with the LM head applied only where the next
    token has a label: only answers carry loss, so logits for image tokens, tags and prompts are never made.
    The labelled rows go through the head and cross-entropy `chunk_tokens` at a time, each chunk recomputed in
    backward, so a long batch never holds all its [N, vocab] logits at once."""
    # Which rows carry a label is worked out where the labels are (``label_rows``): on the host for batches from
    # the collate functions, so picking the rows costs no device→host synchronisation (a boolean mask on the GPU
    # would); the trainer passes them ready-made.
    b, t, d = hidden.shape
    picked = labels if isinstance(labels, LabelRows) else label_rows(labels)
    targets = picked.targets.to(hidden.device, non_blocking=True)  # [N], in the rows' order
    rows = hidden.reshape(b * t, d).index_select(0, picked.index.to(hidden.device, non_blocking=True))  # [N, d]
    if rows.shape[0] <= chunk_tokens:
        return _head_ce(rows, targets, head), picked.count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        total = total + checkpoint(
            _head_ce,
            rows[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            head,
            use_reentrant=False,
        )
    return total, picked.count


def _head_ce(rows: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(rows).float()  # [n, vocab]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


class NVLM(nn.Module):
    """NVLM-D / NVLM-X / NVLM-H over a Hugging Face causal LLM and vision tower. Build with ``nvlm.build``."""

    def __init__(
        self, config: NVLMConfig, llm: CausalLM, vision_model: VisionTower, xattn_device: str | None = None
    ) -> None:
        """`xattn_device`: where the x-attn blocks' tensors are made ("meta": left to a loader, which draws a new
        model's blocks a few rows at a time, ``nvlm.models.xattn_init``; None: the default device)."""
        super().__init__()
        self.config = config
        self.llm = llm
        self.vision = VisionEncoder(
            vision_model, config.vision.type, config.vision.select_layer, config.vision.downsample
        )
        self.vision.requires_grad_(not config.vision.freeze)  # frozen by default, as in both NVLM stages
        self.dims: LLMDims = dims_of(llm.config)
        d = self.dims.hidden_size
        hidden = config.projector.hidden_size or self.dims.ffn_size
        self.projector = build_projector(config.arch, self.vision.out_dim, d, hidden, config.projector.layer_norm_eps)
        r = config.resampler  # optional Perceiver resampler after the projector (Appendix C); None = off, as in NVLM
        self.resampler = PerceiverResampler(d, r.latents, r.layers, r.heads, r.ffn_mult) if r.latents else None
        self.tokens_per_tile: int = r.latents or self.vision.tokens_per_tile  # feature tokens per tile, downstream
        self.xattn_layers: list[int] = []
        self.xattn = nn.ModuleList()
        if config.arch in ("X", "H"):
            self.xattn_layers = schedule(self.dims.num_layers, config.xattn.every, config.xattn.layers)
            with torch.device(xattn_device) if xattn_device else nullcontext():
                blocks = [GatedCrossAttentionBlock(self.dims, config.xattn.ffn_size) for _ in self.xattn_layers]
            self.xattn = nn.ModuleList(blocks)
            layers = decoder_layers(llm)
            for block_idx, layer_idx in enumerate(self.xattn_layers):
                layers[layer_idx] = CrossAttentionDecoderLayer(layers[layer_idx], blocks[block_idx], block_idx)
        self.gate_off = False  # text-only use: skip every cross-attention block
        self.loss_chunk_tokens = 4096  # labelled tokens per LM-head + cross-entropy chunk (labelled_loss)
        # decoding steps through the LLM's layers one after the other (``nvlm.models.llm.decode_step``) where
        # that is exactly the LLM's forward; False: always through the LLM's own forward (the same logits)
        self.layerwise_decode = True

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    # ---- vision → projector ------------------------------------------------------------------------------
    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] tiles → [N, tokens_per_tile, d] projected (and, with a resampler, resampled) features."""
        pixel_values = pixel_values.to(self.device, next(self.vision.parameters()).dtype)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = self.vision(pixel_values)  # [N, 256, 4C]
        out = self.projector(feats.to(next(self.projector.parameters()).dtype))  # [N, 256, d]
        return out if self.resampler is None else self.resampler(out)  # [N, latents, d]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        decoder_tiles: torch.Tensor | None = None,
        memory_index: torch.Tensor | None = None,
        memory_tag_ids: torch.Tensor | None = None,
        pads_checked: bool = False,
        memory_known: bool = False,
    ) -> tuple[torch.Tensor, XAttnState | None, torch.Tensor | None]:
        """Token embeddings with decoder tiles scattered into the pad slots, and the x-attn memory gathered by
        `memory_index` (see ``nvlm.data.processor.memory_tensors``) from the tiles' tokens and the embeddings
        of `memory_tag_ids`. Third: the features of tiles given but used by neither (else None). `pads_checked`:
        the caller has run ``check_image_pads`` on the host ids already (the trainer, whose ids FSDP moves).
        `memory_known`: every block's K/V of the memory are given, so the memory is not gathered (its state holds
        a [B, M, 0] stand-in that gives its shape) and tile features are needed only for decoder tiles."""
        if not pads_checked:
            self.check_image_pads(input_ids, decoder_tiles)
        input_ids = input_ids.to(self.device)
        b, t = input_ids.shape
        has_memory = bool(self.xattn) and memory_index is not None and memory_index.numel() > 0
        # one call of the embedding table for the text and the H tile tags in the memory (a sharded table
        # is gathered once per call)
        flat = input_ids.reshape(-1)
        if has_memory and memory_tag_ids is not None:
            flat = torch.cat([flat, memory_tag_ids.to(flat.device)])
        table = self.llm.get_input_embeddings()(flat)  # [B·T + tags, d]
        embeds = table[: b * t].reshape(b, t, -1)  # [B, T, d]
        n_dec = 0 if decoder_tiles is None else decoder_tiles.numel()
        skip = has_memory and memory_known and not n_dec  # no tile feature is read
        feats = self.encode_tiles(pixel_values) if pixel_values is not None and not skip else None
        if decoder_tiles is not None and n_dec:
            if feats is None:
                raise ValueError(f"{n_dec} decoder tile(s) but no pixel_values")
            is_pad = input_ids == self._image_token_id()
            dec = feats[decoder_tiles.to(feats.device)].reshape(-1, embeds.shape[-1])  # [n·256, d]
            embeds = embeds.masked_scatter(is_pad[..., None], dec.to(embeds.dtype))
        if memory_index is None or not has_memory:
            return embeds, None, feats if not n_dec else None
        if memory_known:
            index = memory_index.to(self.device)  # [B, M], -1 = padding
            return (
                embeds,
                XAttnState(memory=embeds.new_zeros(b, index.shape[1], 0), memory_len=(index >= 0).sum(-1)),
                None,
            )
        d = embeds.shape[-1]
        tiles = feats.reshape(-1, d) if feats is not None else table[:0]  # [N·256, d]: tile i's token t at i·256+t
        source = torch.cat([tiles.to(embeds.dtype), table[b * t :]])  # [N·256 + tags, d]
        index = memory_index.to(self.device)  # [B, M], -1 = padding
        memory = source[index.clamp(min=0)] * (index >= 0)[..., None].to(embeds.dtype)  # [B, M, d], padding zero
        return embeds, XAttnState(memory=memory, memory_len=(index >= 0).sum(-1)), None

    def _image_token_id(self) -> int:
        token_id = self.config.image_token_id
        if token_id is None:
            raise RuntimeError(
                "this NVLM's config has no image_token_id (a weight-less build from architecture dicts): it cannot "
                "run; load it with nvlm.load or build it with nvlm.build"
            )
        return token_id

    def check_image_pads(self, input_ids: torch.Tensor, decoder_tiles: torch.Tensor | None) -> None:
        """Refuse a batch whose image-pad tokens do not match its decoder tiles' feature tokens.

        Counting tokens on an accelerator stalls it until the count reaches the host, so the count is taken
        where it is free: on host ids (every batch from the processor and the collate functions, which
        ``forward`` receives before moving them), and once per image batch otherwise. Decoding steps on an
        accelerator (ids already there, no tiles) skip it: generation never samples the image-pad token."""
        pad_id = self._image_token_id()
        n_dec = 0 if decoder_tiles is None else decoder_tiles.numel()
        if input_ids.device.type != "cpu" and n_dec == 0:
            return
        is_pad = input_ids == pad_id
        n_pad = int(is_pad.sum())
        if n_pad != n_dec * self.tokens_per_tile:
            per_sample = is_pad.sum(-1).tolist()
            raise ValueError(
                f"image placeholders and image features disagree: {n_pad} "
                f"{self.config.tags.image_pad!r} tokens in the batch (per sample {per_sample}) but {n_dec} decoder "
                f"tile(s) × {self.tokens_per_tile} = {n_dec * self.tokens_per_tile} feature tokens; "
                "build inputs with the model's processor (nvlm.load returns it) so each <image> expands to its tiles"
            )

    # ---- the forward pass --------------------------------------------------------------------------------
    # Long on purpose: the three routes (labelled loss, layerwise decoding, the LLM's own forward) side by side,
    # after the inputs they share, so a reader sees which one runs when.
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        decoder_tiles: torch.Tensor | None = None,
        memory_index: torch.Tensor | None = None,
        memory_tag_ids: torch.Tensor | None = None,
        xattn_lo: torch.Tensor | None = None,
        xattn_hi: torch.Tensor | None = None,
        *,
        past_key_values: Any = None,
        xattn_state: XAttnState | None = None,
        memory_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        labels: Any = None,
        label_rows: LabelRows | None = None,
        return_logits: bool = True,
        packed: bool = False,
        pads_checked: bool = False,
    ) -> Output:
        """Logits for a batch from the processor (prefill), or for new tokens given a cache (decode).

        While decoding, pass the previous `past_key_values` and `xattn_state`; new tokens come after every
        image, so they see the whole memory of their sample unless `xattn_lo`/`xattn_hi` say otherwise.
        With `labels` and ``return_logits=False`` (training), the LM head runs only at labelled positions and
        ``Output.logits`` is None: the loss and its gradients are those of the full logits, without computing or
        holding logits for image tokens, tags and prompts (``labelled_loss``).
        With ``packed=True`` the rows are packed samples (no `attention_mask`; `position_ids` restart at each
        sample) and the LLM runs with ``nvlm.models.packed_attention``: attention per sample, boundaries read once.
        `label_rows` (``label_rows(labels)``, made on the host) and `pads_checked` (``check_image_pads`` run on the
        host) spare a sharded run, whose inputs arrive on the GPU, a device→host read each.
        `memory_kv` (block → K, V [B, kvH, M, hd], M = `memory_index`'s width, zeros past a row's memory): each
        block's K/V of this batch's memory when an earlier forward computed them (a serving engine's cache, a
        prompt prefilled in chunks); the blocks then skip their K/V projections and the memory is not gathered.
        """
        # embed checks the image pads on the ids as given (host ids: no synchronisation), then moves them
        embeds, state, unused = self.embed(
            input_ids, pixel_values, decoder_tiles, memory_index, memory_tag_ids, pads_checked, memory_kv is not None
        )
        if state is not None and memory_kv is not None:
            state.kv.update(memory_kv)  # the blocks read these instead of projecting the memory
        input_ids = input_ids.to(self.device)
        state = state or xattn_state
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            if position_ids is None:  # left padding: count only real tokens
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        # With position_ids that restart and no attention_mask (a packed row), the LLM attends within each
        # packed sample only (transformers derives the block-diagonal causal mask from the restarts).
        xattn = self._xattn_inputs(state, input_ids.shape, xattn_lo, xattn_hi)
        extra: dict[str, Any] = {"xattn": xattn} if self.xattn else {}  # the LLM passes it down to its layers
        if packed:  # packed rows: attention per sample (nvlm.models.packed_attention), boundaries read once
            if attention_mask is not None or position_ids is None or past_key_values is not None:
                raise ValueError("packed=True takes position_ids that restart per sample, no attention_mask, no cache")
            extra.update(packed_kwargs(position_ids))
            # the masks the layers get, given ready-made: None, so transformers does not build the dense
            # [rows, 1, T, T] block-diagonal mask that the per-sample attention would ignore
            attention_mask = {"full_attention": None, "sliding_attention": None}  # type: ignore[assignment]
        if labels is not None and not return_logits and not use_cache and self._plain_head():
            # training: run the decoder, then the LM head only where a label is (see labelled_loss)
            hidden = self.llm.get_decoder()(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
            ).last_hidden_state
            picked = label_rows if label_rows is not None else labels
            labelled, count = labelled_loss(hidden, picked, self.llm.get_output_embeddings(), self.loss_chunk_tokens)
            return Output(None, None, state, labelled, count, unused)
        if use_cache and labels is None and self._decoding_layerwise(past_key_values):
            if position_ids is None:  # no padding: the new tokens follow the cached ones
                past = past_key_values.get_seq_length()
                position_ids = torch.arange(past, past + embeds.shape[1], device=embeds.device).expand(*input_ids.shape)
            logits = decode_step(
                self.llm, embeds, attention_mask, position_ids, past_key_values, logits_to_keep, **extra
            )
            if logits is not None:
                return Output(logits, past_key_values, state, unused_features=unused)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **extra,
        )
        loss_sum: torch.Tensor | None = None
        n = 0
        if labels is not None:
            loss_sum, n = self.loss(out.logits, labels)
        return Output(out.logits, out.cache if use_cache else None, state, loss_sum, n, unused)

    def _xattn_inputs(
        self, state: XAttnState | None, shape: torch.Size, lo: torch.Tensor | None, hi: torch.Tensor | None
    ) -> XAttnInputs | None:
        """What the CrossAttentionDecoderLayers read: the memory and, per token, which of it it sees; None (no
        memory, or ``gate_off``) skips every block. Without `lo`/`hi` (a decoding step) each new token sees its
        sample's whole memory."""
        if state is None or self.gate_off:
            return None
        if lo is None:  # decode step: the same mask every step
            allowed, row = state.step_mask(*shape)
        elif hi is None:
            raise ValueError("xattn_lo was given without xattn_hi")
        else:  # one mask for all blocks of this forward
            allowed, row = xattn_mask(lo.to(self.device), hi.to(self.device), state.memory.shape[1])
        return XAttnInputs(state, allowed, row)

    def _decoding_layerwise(self, cache: Any) -> bool:
        """A decoding step (a cache that already holds tokens) of an LLM that ``decode_step`` covers."""
        return (
            self.layerwise_decode
            and cache is not None
            and cache.get_seq_length() > 0
            and self._plain_head()
            and layerwise_decode_ok(self.llm)
        )

    def _plain_head(self) -> bool:
        """Whether logits are just lm_head(final hidden state): not for LLMs that scale or soft-cap them."""
        c = self.llm.config
        return not (getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None))

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over labelled tokens, and their count (mean = sum / count, taken
        over the whole global batch by the trainer, as Megatron does)."""
        shift_logits = logits[:, :-1].float()  # [B, T-1, V]
        count = int((labels[:, 1:] != -100).sum())  # counted where the labels are (host: no synchronisation)
        shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return loss, count

    # ---- convenience ---------------------------------------------------------------------------------
    def generate(self, processor: Any, *args: Any, **kwargs: Any) -> Any:
        """``nvlm.inference.generate.generate(model, processor, …)``."""
        from nvlm.inference.generate import generate

        return generate(self, processor, *args, **kwargs)

    def chat(self, processor: Any, question: str, image: Any = None, images: list | None = None, **kwargs: Any) -> Any:
        """``nvlm.inference.generate.chat(model, processor, …)``: one question about images."""
        from nvlm.inference.generate import chat

        return chat(self, processor, question, image=image, images=images, **kwargs)

    def save_pretrained(self, path: str) -> None:
        save_pretrained(self, path)

    def describe(self) -> str:
        """A one-paragraph summary: architecture, backbone shapes, tiles, cross-attention schedule."""
        c, v = self.config, self.vision
        lines = [
            f"NVLM-{c.arch}: LLM {self.llm.config.model_type} ({self.dims.num_layers} layers, width "
            f"{self.dims.hidden_size}), vision {v.kind} ({v.tile_size} px tiles → {v.tokens_per_tile} tokens × "
            f"{v.out_dim}), tags {c.tags.style}/{c.tags.mode}"
        ]
        if self.resampler is not None:
            r = c.resampler
            lines.append(f"Perceiver resampler: {r.latents} latents per tile, {r.layers} layers, {r.heads} heads")
        if self.xattn_layers:
            lines.append(
                f"gated cross-attention: {len(self.xattn_layers)} blocks, before LLM layers {self.xattn_layers}"
            )
        return "\n".join(lines)
