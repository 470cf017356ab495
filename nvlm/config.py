"""The model configuration: one typed, validated dataclass tree saved as ``config.json`` with every model.

Sections follow the paper's nouns (§4): the vision pathway (tiling, encoder, pixel shuffle), the tile tags,
the projector, and the gated cross-attention blocks of NVLM-X / NVLM-H. Unknown keys are errors, so a typo
in a config file fails loudly instead of silently training the wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

ARCHS = ("D", "X", "H")
TAG_STYLES = ("none", "1d", "2d_grid", "2d_bbox")
TAG_MODES = ("text", "special")
VISION_TYPES = ("internvl", "siglip", "clip")
TEMPLATES = ("chatml", "release")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key and the fix."""


@dataclass(kw_only=True)
class TilingConfig:
    """Dynamic high-resolution tiling (paper §4.1, SPEC §2)."""

    min_tiles: int = 1
    """Fewest regular tiles per image."""
    max_tiles: int = 6
    """Most regular tiles per image (the paper uses 6; the thumbnail comes on top)."""
    use_thumbnail: bool = True
    """Append a global thumbnail tile (whole image at tile size) when an image has more than one tile."""
    max_pixels: int = 25_000_000
    """Images with more pixels than this are refused before decoding (``nvlm.vision.image_io.DEFAULT_MAX_PIXELS``)."""

    def validate(self, prefix: str = "tiling") -> None:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(
                f"{prefix}.min_tiles/max_tiles must satisfy 1 <= min <= max, got {self.min_tiles}/{self.max_tiles}"
            )
        if self.max_tiles > 40:  # nvlm.vision.tiling.MAX_TILES_LIMIT (not imported: config stays dependency-free)
            raise ConfigError(f"{prefix}.max_tiles must be at most 40 (the tiler's ceiling), got {self.max_tiles}")
        if self.max_pixels < 1:
            raise ConfigError(f"{prefix}.max_pixels must be positive, got {self.max_pixels}")


@dataclass(kw_only=True)
class TagConfig:
    """Tile tags (paper §4.2, Table 1) and the image-block strings of the released checkpoint."""

    style: Literal["none", "1d", "2d_grid", "2d_bbox"] = "1d"
    """`none`; `1d` = <tile_1>…<tile_K>; `2d_grid` = <tile_x{c}_y{r}>; `2d_bbox` = <box>(x0,y0),(x1,y1)</box>."""
    mode: Literal["text", "special"] = "text"
    """`text`: tags are plain BPE text (released NVLM-D-72B); `special`: one added token per tag."""
    thumbnail_tag: str = "<tile_global_thumbnail>"
    """Tag of the thumbnail (and of the lone tile of a 1×1 image)."""
    image_start: str = "<Image>"
    image_end: str = "</Image>"
    image_pad: str = "<|vision_pad|>"
    """Placeholder token, repeated once per image-feature token in the decoder sequence."""

    def validate(self, prefix: str = "tags") -> None:
        if self.style not in TAG_STYLES:
            raise ConfigError(f"{prefix}.style must be one of {TAG_STYLES}, got {self.style!r}")
        if self.mode not in TAG_MODES:
            raise ConfigError(f"{prefix}.mode must be one of {TAG_MODES}, got {self.mode!r}")


@dataclass(kw_only=True)
class VisionConfig:
    """The vision encoder (a Hugging Face vision model) and what we take from it."""

    type: Literal["internvl", "siglip", "clip"] = "internvl"
    """Which transformers vision model: InternViT (`InternVLVisionModel`), `SiglipVisionModel`, `CLIPVisionModel`."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """The encoder's own Hugging Face config (saved so a checkpoint rebuilds without the original path)."""
    select_layer: int = -1
    """Which hidden layer to use; -1 = the last layer's output."""
    downsample: float = 0.5
    """Pixel-shuffle ratio: 0.5 merges 2×2 patches into one token of 4× width (paper §4.1); 1.0 = off."""
    freeze: bool = True
    """Keep the encoder frozen in both stages (the paper's recipe); unfreeze for weak encoders."""
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    """Normalisation; None = the encoder's own constants (ImageNet for InternViT)."""

    def validate(self, prefix: str = "vision") -> None:
        if self.type not in VISION_TYPES:
            raise ConfigError(f"{prefix}.type must be one of {VISION_TYPES}, got {self.type!r}")
        if self.downsample not in (0.5, 1.0):
            raise ConfigError(f"{prefix}.downsample must be 0.5 (pixel shuffle) or 1.0 (off), got {self.downsample}")


@dataclass(kw_only=True)
class LLMConfig:
    """The backbone LLM: any Hugging Face causal decoder."""

    hf_config: dict[str, Any] = field(default_factory=dict)
    """The LLM's own Hugging Face config."""


@dataclass(kw_only=True)
class ProjectorConfig:
    """Modality-alignment MLP (paper §4.5): D/H: LayerNorm→Linear→GELU→Linear (no biases); X: one Linear."""

    hidden_size: int | None = None
    """Hidden width of the 2-layer MLP; None = the LLM's FFN size, as released (29568 for Qwen2-72B)."""
    layer_norm_eps: float = 1e-5


@dataclass(kw_only=True)
class XAttnConfig:
    """Gated cross-attention blocks of NVLM-X and NVLM-H (paper §4.3–4.4). Ignored for NVLM-D."""

    every: int | None = None
    """Insert a block before every `every`-th LLM layer (0, k, 2k, …); None = about 10 blocks, as in the paper."""
    layers: list[int] | None = None
    """Explicit LLM layer indices to put a block before; overrides `every`."""
    ffn_size: int | None = None
    """FFN width inside each block; None = the LLM's FFN size."""

    def validate(self, prefix: str = "xattn") -> None:
        if self.every is not None and self.every < 1:
            raise ConfigError(f"{prefix}.every must be >= 1, got {self.every}")


@dataclass(kw_only=True)
class ResamplerConfig:
    """Optional Perceiver resampler per tile after the projector (paper Appendix C; ``nvlm.vision.resampler``).
    Off by default: NVLM uses none."""

    latents: int = 0
    """Learned latents per tile, which replace the tile's tokens everywhere (decoder and x-attn memory); 0 = off."""
    layers: int = 2
    """Resampler layers (cross-attention of the latents over [tile tokens ; latents], then an MLP)."""
    heads: int = 4
    """Attention heads; must divide the LLM's width."""
    ffn_mult: int = 4
    """MLP width as a multiple of the LLM's width (Flamingo's 4)."""

    def validate(self, prefix: str = "resampler") -> None:
        if self.latents < 0:
            raise ConfigError(f"{prefix}.latents must be >= 0 (0 = no resampler), got {self.latents}")
        for key in ("layers", "heads", "ffn_mult"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class NVLMConfig:
    """Everything needed to rebuild an NVLM model; saved as config.json next to the weights."""

    arch: Literal["D", "X", "H"] = "D"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    template: Literal["chatml", "release"] = "chatml"
    """Prompt format of ``model.chat``: `chatml` = Megatron's training format (newline after each <|im_end|>,
    tags tokenized piece by piece); `release` = NVLM-D-72B's own ``chat()`` (system "Answer the questions.", no
    newline after <|im_end|>, the whole prompt tokenized at once; NVLM-D only). See nvlm.data.chat."""
    image_token_id: int | None = None
    """The image-pad token's id in the processor's tokenizer: the model scatters tile features into these slots
    and never samples it. Set when the model is built (None: a weight-less build from architecture dicts)."""
    format_version: int = 1

    def validate(self) -> NVLMConfig:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.template not in TEMPLATES or (self.template == "release" and self.arch != "D"):
            raise ConfigError(
                f"template must be one of {TEMPLATES} ('release' for NVLM-D only: it is the released "
                f"NVLM-D's prompt), got {self.template!r} for NVLM-{self.arch}"
            )
        self.vision.validate()
        self.tiling.validate()
        self.tags.validate()
        self.xattn.validate()
        self.resampler.validate()
        return self

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NVLMConfig:
        return from_dict(cls, data, "").validate()

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NVLMConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{prefix}{key}.")
        else:
            if not _matches(value, hint):  # a string where a number belongs fails here, naming the key
                raise ConfigError(f"{prefix}{key} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")
            kwargs[key] = tuple(value) if _is_tuple(hint) and isinstance(value, list) else value
    return cls(**kwargs)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON/YAML value fits a field's type hint (an int is a float; a bool is not a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and Ellipsis not in args:  # tuple[int, str]: fixed length
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)  # list[int], tuple[float, ...]
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _is_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return typing.get_origin(hint) is tuple


_VOLATILE_HF_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def clean_hf_config(d: dict[str, Any]) -> dict[str, Any]:
    """A backbone's HF config dict without the keys that change on every save/load (paths, versions, dtype),
    in its JSON form (so what is in memory equals what a reload gives)."""
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _VOLATILE_HF_KEYS}))


def apply_overrides(cfg: NVLMConfig, overrides: dict[str, Any]) -> NVLMConfig:
    """Set dotted keys (`tags.style="2d_grid"`) on a config, checking each key exists."""
    data = cfg.to_dict()
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {dotted!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {dotted!r}")
        node[parts[-1]] = value
    return NVLMConfig.from_dict(data)
