"""Text + images → model inputs: the image blocks of §4.2–4.4 spliced into tokenized text, and batching.

A prompt holds one ``<image>`` placeholder per image. Each is replaced by the architecture's image block
(``nvlm.data.layout``): tags and ``<Image>``/``</Image>`` are tokenized as text (or as single added tokens in
special-token mode), each decoder tile becomes ``tokens_per_tile`` copies of the image-pad token, and memory
tiles are recorded for the cross-attention memory. Pieces are tokenized separately, so BPE never merges across
a tag boundary (as in Megatron's training path).

For X/H every token also gets a cross-attention range [lo, hi) into its sample's memory: tile tags of NVLM-X see
only their tile; other tokens see every image whose ``</Image>`` is at or before them; padding sees nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvlm.config import NVLMConfig
from nvlm.data.layout import image_block
from nvlm.data.tags import all_tags
from nvlm.vision.encoder import default_mean_std, tile_geometry
from nvlm.vision.image_io import load_image
from nvlm.vision.tiling import TilePlan, check_tile_counts, plan_tiles, tile_image, tiles_to_tensor

IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_CONTROL = (IM_START, IM_END, END_OF_TEXT)
"""ChatML's control strings: refused inside message content (``nvlm.data.chat``, ``nvlm.data.formats``)."""
TILE_TAG_PATTERN = r"<tile_\d+>|<tile_x\d+_y\d+>"
"""Shapes of the 1d and 2d_grid tile tags at any tile count (2d_bbox tags are ordinary box text, not refused)."""


class ControlTokenError(ValueError):
    """User-supplied text holds a string reserved for the prompt format.

    Policy: REFUSE, never escape. Such a string would tokenize as a control token or a tag (a question could
    forge a system turn, end its own turn, or fake a tile), and there is no spelling of it that both keeps the
    text exact and tokenizes as plain text in every tokenizer, so the input is rejected with this error.
    Training counts such a sample as bad (``nvlm.data.blend``); ``nvlm chat`` reports it as a user error.
    """


def reserved_pattern(strings: Iterable[str], tile_tags: bool = True) -> re.Pattern[str]:
    """One regex matching any of `strings` (and any tile tag): ``pattern.search(text)`` finds a forbidden one."""
    parts = [re.escape(s) for s in sorted({s for s in strings if s}, key=len, reverse=True)]
    return re.compile("|".join(parts + ([TILE_TAG_PATTERN] if tile_tags else [])) or r"(?!)")


CHATML_PATTERN = reserved_pattern(CHATML_CONTROL, tile_tags=False)


def check_user_text(text: str, pattern: re.Pattern[str] = CHATML_PATTERN, what: str = "text") -> str:
    """`text` unchanged, or ControlTokenError naming the reserved string found and what to do."""
    hit = pattern.search(text)
    if hit is not None:
        start = max(0, hit.start() - 30)
        raise ControlTokenError(
            f"{what} contains {hit.group()!r}, which is reserved for the prompt format (it would act as a control "
            f"token or tag); remove it or write it differently, e.g. with a space inside: "
            f"...{text[start : hit.end() + 30]!r}"
        )
    return text


def reserved_strings(tokenizer: Any, config: NVLMConfig) -> list[str]:
    """Everything user text must not contain, besides tile tags: ChatML control strings, the image markers and
    image-pad token, and every special token the tokenizer knows (its own and the ones nvlm added)."""
    tags = config.tags
    out = [*CHATML_CONTROL, tags.image_start, tags.image_end, tags.image_pad, tags.thumbnail_tag]
    out += list(getattr(tokenizer, "all_special_tokens", []))
    out += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", 0)]
    return out


@dataclass
class Encoded:
    """One sample: token ids, its tiles, which tiles fill the decoder's pad runs, and its x-attn memory recipe."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [tiles, 3, S, S]
    decoder_tiles: list[int]  # local tile indices, in the order of their pad runs
    memory: list[tuple[str, Any]]  # ("ids", [token ids]) | ("tile", local tile index)
    memory_len: int
    xattn_lo: list[int]
    xattn_hi: list[int]
    plans: list[TilePlan] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # -100 where no loss


@dataclass(frozen=True)
class TiledImage:
    """An image cut into tiles by ``Processor.tile`` for a budget of `max_tiles` regular tiles: its plan and its
    tiles [N, 3, S, S], normalised. A sample built from it skips decoding and tiling (a server keeps these for
    images sent again)."""

    plan: TilePlan
    pixel_values: torch.Tensor
    max_tiles: int


def memory_tensors(recipes: list[list[tuple[str, Any]]], tokens_per_tile: int, n_tiles: int) -> dict[str, Any]:
    """Each row's x-attn memory recipe → the tensors the model gathers it with (it parses no recipe):

    ``memory_index`` [B, M] long (-1 = padding) into one table of the batch's memory sources: the projected
    tokens of every tile (tile i's token t at i·T + t), then the embeddings of ``memory_tag_ids`` [K] (NVLM-H's
    tile tags as text, tag token j at n_tiles·T + j)."""
    tag_ids: list[int] = []
    rows: list[list[int]] = []
    first_tag = n_tiles * tokens_per_tile
    for recipe in recipes:
        row: list[int] = []
        for kind, v in recipe:
            if kind == "tile":
                row += range(v * tokens_per_tile, (v + 1) * tokens_per_tile)
            else:
                row += range(first_tag + len(tag_ids), first_tag + len(tag_ids) + len(v))
                tag_ids += v
        rows.append(row)
    index = torch.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        index[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return {"memory_index": index, "memory_tag_ids": torch.tensor(tag_ids, dtype=torch.long)}


def add_special_tokens(tokenizer: Any, tokens: list[str]) -> int:
    """Register `tokens` as single special tokens (those not already in the vocabulary); returns how many."""
    new = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if not new:
        return 0
    return tokenizer.add_tokens(new, special_tokens=True)


def add_nvlm_tokens(tokenizer: Any, config: NVLMConfig) -> None:
    """Give `tokenizer` NVLM's tokens (those it lacks): the image-pad token is always one token; in special-token
    mode so are the tags and image markers. A new model's embeddings then grow to ``len(tokenizer)``."""
    tags = config.tags
    tokens = [tags.image_pad]
    if tags.mode == "special":
        size, _ = tile_geometry(config.vision.hf_config, config.vision.downsample)
        tokens += [tags.image_start, tags.image_end]
        tokens += all_tags(tags.style, tags.thumbnail_tag, size, config.tiling.min_tiles, config.tiling.max_tiles)
    add_special_tokens(tokenizer, tokens)


class Processor:
    """Tokenizer + tiling for one NVLM config; `encode` one sample, `collate` a batch.

    It lives beside the model, not inside it (``nvlm.load`` returns both): the data pipeline, the server and the
    evaluation encode with it without a model in reach, and it is saved with the model's checkpoint
    (the tokenizer files and ``preprocessor_config.json``)."""

    def __init__(self, tokenizer: Any, config: NVLMConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        v = config.vision
        self.tile_size, tokens = tile_geometry(v.hf_config, v.downsample)
        self.tokens_per_tile = config.resampler.latents or tokens  # feature tokens per tile, as the model makes
        mean, std = default_mean_std(v.type)
        self.mean, self.std = tuple(v.image_mean or mean), tuple(v.image_std or std)
        self.pad_id = tokenizer.convert_tokens_to_ids(config.tags.image_pad)
        if self.pad_id is None or self.pad_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {config.tags.image_pad!r} token; build the model with nvlm.build")
        if config.image_token_id is not None and config.image_token_id != self.pad_id:
            raise ValueError(
                f"the tokenizer's {config.tags.image_pad!r} is token {self.pad_id} but the model's config says "
                f"{config.image_token_id}: this tokenizer is not the model's (load both with nvlm.load)"
            )
        self._cache: dict[str, list[int]] = {}
        # Prompt text is rendered ChatML, so the template's own <|im_start|>/<|im_end|> are allowed here; inside
        # message content they are refused earlier, by the renderers (nvlm.data.chat, nvlm.data.formats).
        template = {IM_START, IM_END}
        self.reserved = reserved_pattern(s for s in reserved_strings(tokenizer, config) if s not in template)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: NVLMConfig | None = None) -> Processor:
        """The processor saved in an nvlm checkpoint folder: its tokenizer and its config.json (or `config`)."""
        from transformers import AutoTokenizer

        root = Path(path)
        if not (root / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{root}: no tokenizer there (tokenizer_config.json); save the processor beside the model: "
                "processor.save_pretrained(path)"
            )
        config = config or NVLMConfig.load(root / "config.json")
        return cls(AutoTokenizer.from_pretrained(root, trust_remote_code=False), config)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The tokenizer (with NVLM's tokens) and ``preprocessor_config.json`` (tile size, tiling limits and
        normalisation, for other tools; config.json rules)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        tiling = self.config.tiling
        pre = {
            "tile_size": self.tile_size,
            "tokens_per_tile": self.tokens_per_tile,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "min_tiles": tiling.min_tiles,
            "max_tiles": tiling.max_tiles,
            "use_thumbnail": tiling.use_thumbnail,
        }
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

    def check_text(self, text: str, what: str = "prompt text") -> str:
        """`text` unchanged, or ControlTokenError if it holds a special token, image marker or tile tag (for a
        server: call it on each user message's content, with ``check_user_text`` for the ChatML strings)."""
        hit = self.reserved.search(text)
        if hit is not None and hit.group() == self.config.tags.image_pad:
            raise ControlTokenError(
                f"{what} contains the image-pad token {hit.group()!r}; remove it (images are "
                f"passed as {IMAGE_PLACEHOLDER} placeholders): {text[:200]!r}"
            )
        check_user_text(text, self.reserved, what)
        return text

    def tokens(self, text: str) -> list[int]:
        """Token ids of a tag or image marker; cached, since these strings form a small fixed set."""
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def encode(
        self, text: str, images: list[Any] | None = None, max_tiles: int | Sequence[int] | None = None
    ) -> Encoded:
        """`text` with one ``<image>`` per image (paths, bytes or PIL images) → an `Encoded` sample.
        `max_tiles` overrides ``tiling.max_tiles`` for this call: one number for every image, or one per image."""
        return self.encode_segments([(text, False)], images, max_tiles)

    def encode_segments(
        self,
        segments: list[tuple[str, bool]],
        images: list[Any] | None = None,
        max_tiles: int | Sequence[int] | None = None,
    ) -> Encoded:
        """Like `encode` for text given as (piece, trainable) segments; `labels` copy the ids of trainable
        pieces and are -100 elsewhere (image tokens and tags are never trainable)."""
        images = list(images or [])
        budgets = self.tile_budgets(max_tiles, len(images))
        n_placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t, _ in segments)
        if n_placeholders != len(images):
            text = "".join(t for t, _ in segments)
            raise ValueError(
                f"prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{len(images)} image(s) were given: {text[:200]!r}"
            )
        sample = _SampleBuilder(self, budgets)
        bos = self.tokenizer.bos_token_id if getattr(self.tokenizer, "add_bos_token", False) else None
        if bos is not None:
            sample.emit([bos], 0, 0)
        for seg_text, train in segments:
            for j, part in enumerate(seg_text.split(IMAGE_PLACEHOLDER)):
                if j:  # an <image> placeholder stood before this part
                    sample.image(images[len(sample.plans)])
                sample.text(self.check_text(part), train, cache=False)  # free text: not cached, a run sees millions
        return sample.result()

    def tile(self, source: Any, max_tiles: int | None = None) -> TiledImage:
        """Decode `source` (path, bytes or PIL image) and cut it into tiles (paper §4.2) for a budget of
        `max_tiles` regular tiles (default: the config's)."""
        tiling = self.config.tiling
        top = tiling.max_tiles if max_tiles is None else max_tiles
        image = load_image(source, max_pixels=tiling.max_pixels)
        low = min(tiling.min_tiles, top)
        plan = plan_tiles(image.width, image.height, self.tile_size, low, top, tiling.use_thumbnail)
        return TiledImage(plan, tiles_to_tensor(tile_image(image, plan), self.mean, self.std), top)

    def tile_budgets(self, max_tiles: int | Sequence[int] | None, n: int) -> list[int]:
        """Each image's most regular tiles: the config's, or this call's (one for all, or one per image)."""
        tiling, tags = self.config.tiling, self.config.tags
        if max_tiles is None:
            return [tiling.max_tiles] * n
        budgets = [max_tiles] * n if isinstance(max_tiles, int) else list(max_tiles)
        if len(budgets) != n:
            raise ValueError(f"max_tiles has {len(budgets)} entries for {n} image(s); give one per image")
        for b in budgets:
            check_tile_counts(1, b)
            if tags.mode == "special" and tags.style != "none" and b > tiling.max_tiles:
                raise ValueError(
                    f"max_tiles {b} is over this model's tiling.max_tiles ({tiling.max_tiles}): its tile tags are "
                    "added tokens that exist only up to that count"
                )
        return budgets

    def collate(self, samples: list[Encoded], padding_side: str = "left") -> dict[str, Any]:
        """Pad to a batch. Left padding for generation, right for training; padding sees no memory."""
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        width = max(len(s.input_ids) for s in samples)
        rows, mask, lo, hi, labels = [], [], [], [], []
        decoder_tiles: list[int] = []
        memory: list[list[tuple[str, Any]]] = []
        pixel_values = []
        offset = 0
        for s in samples:
            n = width - len(s.input_ids)
            left, right = (n, 0) if padding_side == "left" else (0, n)
            rows.append([pad] * left + s.input_ids + [pad] * right)
            mask.append([0] * left + [1] * len(s.input_ids) + [0] * right)
            lo.append([0] * left + s.xattn_lo + [0] * right)
            hi.append([0] * left + s.xattn_hi + [0] * right)
            labels.append([-100] * left + (s.labels or [-100] * len(s.input_ids)) + [-100] * right)
            decoder_tiles += [offset + t for t in s.decoder_tiles]
            memory.append([(k, offset + v if k == "tile" else v) for k, v in s.memory])
            if s.pixel_values is not None:
                pixel_values.append(s.pixel_values)
                offset += s.pixel_values.shape[0]
        return {
            "input_ids": torch.tensor(rows),
            "attention_mask": torch.tensor(mask),
            "pixel_values": torch.cat(pixel_values) if pixel_values else None,
            "decoder_tiles": torch.tensor(decoder_tiles, dtype=torch.long),
            **memory_tensors(memory, self.tokens_per_tile, offset),
            "xattn_lo": torch.tensor(lo),
            "xattn_hi": torch.tensor(hi),
            "labels": torch.tensor(labels),
        }

    def __call__(
        self, texts: str | list[str], images: list[Any] | list[list[Any]] | None = None, padding_side: str = "left"
    ) -> dict[str, Any]:
        """Encode and collate: one text with its images, or a list of texts with a list of image lists."""
        if isinstance(texts, str):
            return self.collate([self.encode(texts, images)], padding_side)
        images = images or [[] for _ in texts]
        return self.collate([self.encode(t, im) for t, im in zip(texts, images, strict=True)], padding_side)


class _SampleBuilder:
    """One sample under construction: token ids and labels, each token's x-attn range [lo, hi), the tiles, which
    tiles fill the decoder's pad runs, and the x-attn memory recipe, appended image block by image block."""

    def __init__(self, proc: Processor, budgets: list[int]) -> None:
        self.proc, self.cfg, self.budgets = proc, proc.config, budgets
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.lo: list[int] = []
        self.hi: list[int] = []
        self.tiles: list[torch.Tensor] = []
        self.plans: list[TilePlan] = []
        self.decoder_tiles: list[int] = []
        self.memory: list[tuple[str, Any]] = []
        self.mem_len = 0  # memory tokens so far
        self.seen = 0  # regular text sees memory [0, seen): the images whose block has closed
        # template "release" (NVLM-D): the released chat() tokenizes the whole prompt at once, so BPE may merge
        # across tag boundaries; text is joined and tokenized at each image-pad run (a special token, where any
        # tokenizer splits) to give exactly the release's ids
        self.joined: list[str] | None = [] if self.cfg.template == "release" else None
        self.joined_train = False

    def emit(self, new: list[int], lo: int, hi: int, train: bool = False) -> None:
        self.ids.extend(new)
        self.labels.extend(new if train else [-100] * len(new))
        self.lo.extend([lo] * len(new))
        self.hi.extend([hi] * len(new))

    def text(self, s: str, train: bool, cache: bool) -> None:
        """Text that sees the images before it; tokenized now, or joined with its neighbours (release mode)."""
        if self.joined is None:
            tokenize = self.proc.tokens if cache else self._tokenize
            return self._emit_text(tokenize(s), s, train)
        if self.joined and train != self.joined_train:
            self.flush()
        self.joined.append(s)
        self.joined_train = train

    def flush(self) -> None:
        if self.joined:  # None (chatml) or empty: nothing waits
            s = "".join(self.joined)
            self.joined.clear()
            self._emit_text(self._tokenize(s), s, self.joined_train)

    def _tokenize(self, s: str) -> list[int]:
        return self.proc.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    def _emit_text(self, new: list[int], s: str, train: bool) -> None:
        if self.proc.pad_id in new:  # e.g. a tokenizer that merges text into the pad token
            raise ControlTokenError(
                f"prompt text tokenizes to the image-pad token {self.cfg.tags.image_pad!r}; remove it: {s[:200]!r}"
            )
        self.emit(new, 0, self.seen, train)

    def image(self, source: Any) -> None:
        """Tile an image and append its block (paper §4.2–4.4): memory pieces, then the decoder pieces."""
        cfg, proc, tpt = self.cfg, self.proc, self.proc.tokens_per_tile
        top = self.budgets[len(self.plans)]
        tiled = source if isinstance(source, TiledImage) else proc.tile(source, top)
        if tiled.max_tiles != top or tiled.plan.tile_size != proc.tile_size:
            raise ValueError(
                f"image {len(self.plans) + 1} was tiled for {tiled.max_tiles} tiles of {tiled.plan.tile_size} px; "
                f"this sample asks for {top} of {proc.tile_size} px: tile it again with Processor.tile"
            )
        plan = tiled.plan
        base = sum(p.num_tiles for p in self.plans)  # this image's first tile in the sample
        self.plans.append(plan)
        self.tiles.append(tiled.pixel_values)
        block = image_block(
            cfg.arch, plan, cfg.tags.style, cfg.tags.thumbnail_tag, cfg.tags.image_start, cfg.tags.image_end
        )
        tile_span: dict[int, tuple[int, int]] = {}
        for piece in block.memory:  # this image's memory, appended after earlier images'
            if piece.kind == "tile":
                self.memory.append(("tile", base + piece.tile))
                tile_span[piece.tile] = (self.mem_len, self.mem_len + tpt)
                self.mem_len += tpt
            else:
                tag_ids = proc.tokens(piece.text)
                self.memory.append(("ids", tag_ids))
                self.mem_len += len(tag_ids)
        for k, piece in enumerate(block.decoder):
            if k == len(block.decoder) - 1:  # </Image>: from here on this image is visible
                self.seen = self.mem_len
            if piece.kind == "tile":
                self.flush()
                self.decoder_tiles.append(base + piece.tile)
                self.emit([proc.pad_id] * tpt, 0, self.seen)
            elif piece.own_tile_only:  # an NVLM-X tile tag sees only its own tile
                self.emit(proc.tokens(piece.text), *tile_span[piece.tile])
            else:
                self.text(piece.text, False, cache=True)

    def result(self) -> Encoded:
        self.flush()
        pixel_values = torch.cat(self.tiles) if self.tiles else None
        return Encoded(
            self.ids,
            pixel_values,
            self.decoder_tiles,
            self.memory,
            self.mem_len,
            self.lo,
            self.hi,
            self.plans,
            self.labels,
        )
