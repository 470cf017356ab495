"""The model configuration: one typed, validated dataclass tree saved as ``config.json`` with every model.

Sections follow the paper's nouns (§4): the vision pathway (tiling, encoder, pixel shuffle), the tile tags,
the projector, and the gated cross-attention blocks of NVLM-X / NVLM-H. Unknown keys are errors, so a typo
in a config file fails loudly instead of silently training the wrong model; each field's bounds sit beside it
and ``nvlm.config_schema.check`` judges them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nvlm.config_schema import ConfigError as ConfigError
from nvlm.config_schema import bounded, check, from_dict, with_overrides
from nvlm.vision.tiling import MAX_TILES_LIMIT

Arch = Literal["D", "X", "H"]
TagStyle = Literal["none", "1d", "2d_grid", "2d_bbox"]
TagMode = Literal["text", "special"]
VisionType = Literal["internvl", "siglip", "clip"]
Template = Literal["chatml", "release"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)


@dataclass(kw_only=True)
class TilingConfig:
    """Dynamic high-resolution tiling (paper §4.1)."""

    min_tiles: int = bounded(1, ge=1, le=MAX_TILES_LIMIT)
    """Fewest regular tiles per image."""
    max_tiles: int = bounded(6, ge=1, le=MAX_TILES_LIMIT, note="the tiler's ceiling; the paper uses 6")
    """Most regular tiles per image (the paper uses 6; the thumbnail comes on top)."""
    use_thumbnail: bool = True
    """Append a global thumbnail tile (whole image at tile size) when an image has more than one tile."""
    max_pixels: int = bounded(25_000_000, ge=1)
    """Images with more pixels than this are refused before decoding (``nvlm.vision.image_io.DEFAULT_MAX_PIXELS``)."""


@dataclass(kw_only=True)
class TagConfig:
    """Tile tags (paper §4.2, Table 1) and the image-block strings of the released checkpoint."""

    style: TagStyle = "1d"
    """`none`; `1d` = <tile_1>…<tile_K>; `2d_grid` = <tile_x{c}_y{r}>; `2d_bbox` = <box>(x0,y0),(x1,y1)</box>."""
    mode: TagMode = "text"
    """`text`: tags are plain BPE text (released NVLM-D-72B); `special`: one added token per tag."""
    thumbnail_tag: str = "<tile_global_thumbnail>"
    """Tag of the thumbnail (and of the lone tile of a 1×1 image)."""
    image_start: str = "<Image>"
    image_end: str = "</Image>"
    image_pad: str = "<|vision_pad|>"
    """Placeholder token, repeated once per image-feature token in the decoder sequence."""


@dataclass(kw_only=True)
class VisionConfig:
    """The vision encoder (a Hugging Face vision model) and what we take from it."""

    type: VisionType = "internvl"
    """Which transformers vision model: InternViT (`InternVLVisionModel`), `SiglipVisionModel`, `CLIPVisionModel`."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """The encoder's own Hugging Face config (saved so a checkpoint rebuilds without the original path)."""
    select_layer: int = -1
    """Which hidden layer to use; -1 = the last layer's output."""
    downsample: float = bounded(0.5, one_of=(0.5, 1.0), note="0.5: pixel shuffle, 1.0: off")
    """Pixel-shuffle ratio: 0.5 merges 2×2 patches into one token of 4× width (paper §4.1); 1.0 = off."""
    freeze: bool = True
    """Keep the encoder frozen in both stages (the paper's recipe); unfreeze for weak encoders."""
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    """Normalisation; None = the encoder's own constants (ImageNet for InternViT)."""


@dataclass(kw_only=True)
class LLMConfig:
    """The backbone LLM: any Hugging Face causal decoder."""

    hf_config: dict[str, Any] = field(default_factory=dict)
    """The LLM's own Hugging Face config."""


@dataclass(kw_only=True)
class ProjectorConfig:
    """Modality-alignment MLP (paper §4.5): D/H: LayerNorm→Linear→GELU→Linear (no biases); X: one Linear."""

    hidden_size: int | None = bounded(None, ge=1)
    """Hidden width of the 2-layer MLP; None = the LLM's FFN size, as released (29568 for Qwen2-72B)."""
    layer_norm_eps: float = bounded(1e-5, gt=0)


@dataclass(kw_only=True)
class XAttnConfig:
    """Gated cross-attention blocks of NVLM-X and NVLM-H (paper §4.3–4.4). Ignored for NVLM-D."""

    every: int | None = bounded(None, ge=1)
    """Insert a block before every `every`-th LLM layer (0, k, 2k, …); None = about 10 blocks, as in the paper."""
    layers: list[int] | None = None
    """Explicit LLM layer indices to put a block before; overrides `every`."""
    ffn_size: int | None = bounded(None, ge=1)
    """FFN width inside each block; None = the LLM's FFN size."""


@dataclass(kw_only=True)
class ResamplerConfig:
    """Optional Perceiver resampler per tile after the projector (paper Appendix C; ``nvlm.vision.resampler``).
    Off by default: NVLM uses none."""

    latents: int = bounded(0, ge=0, note="0 = no resampler")
    """Learned latents per tile, which replace the tile's tokens everywhere (decoder and x-attn memory); 0 = off."""
    layers: int = bounded(2, ge=1)
    """Resampler layers (cross-attention of the latents over [tile tokens ; latents], then an MLP)."""
    heads: int = bounded(4, ge=1)
    """Attention heads; must divide the LLM's width."""
    ffn_mult: int = bounded(4, ge=1)
    """MLP width as a multiple of the LLM's width (Flamingo's 4)."""


@dataclass(kw_only=True)
class NVLMConfig:
    """Everything needed to rebuild an NVLM model; saved as config.json next to the weights."""

    arch: Arch = "D"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    template: Template = "chatml"
    """Prompt format of ``model.chat``: `chatml` = Megatron's training format (newline after each <|im_end|>,
    tags tokenized piece by piece); `release` = NVLM-D-72B's own ``chat()`` (system "Answer the questions.", no
    newline after <|im_end|>, the whole prompt tokenized at once; NVLM-D only). See nvlm.data.chat."""
    format_version: int = 1

    def validate(self) -> NVLMConfig:
        """This config, when every field has its type and bounds and the fields agree with each other."""
        check(self)
        if self.tiling.min_tiles > self.tiling.max_tiles:
            raise ConfigError(
                f"tiling.min_tiles ({self.tiling.min_tiles}) must be <= tiling.max_tiles ({self.tiling.max_tiles})"
            )
        if self.template == "release" and self.arch != "D":
            raise ConfigError(
                f"template 'release' is the released NVLM-D's prompt, so NVLM-D only; use template=chatml "
                f"for NVLM-{self.arch}"
            )
        return self

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NVLMConfig:
        return from_dict(cls, data).validate()

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NVLMConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


_VOLATILE_HF_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def clean_hf_config(d: dict[str, Any]) -> dict[str, Any]:
    """A backbone's HF config dict without the keys that change on every save/load (paths, versions, dtype),
    in its JSON form (so what is in memory equals what a reload gives)."""
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _VOLATILE_HF_KEYS}))


def apply_overrides(cfg: NVLMConfig, overrides: Mapping[str, Any] | Iterable[str]) -> NVLMConfig:
    """`cfg` with dotted keys set (``{"tags.style": "2d_grid"}`` or ``["tags.style=2d_grid"]``), validated."""
    return NVLMConfig.from_dict(with_overrides(cfg, overrides))
