"""``nvlm convert``: the release layout ↔ our format, streamed tensor by tensor (never the whole model in memory).

* ``to_ours`` (release → ours): ``language_model.*`` → llm/, ``vision_model.*`` → vision/ (dummy heads sliced
  out), ``mlp1.*`` → model.safetensors, plus our config.json, the backbones' HF configs, the tokenizer files as
  shipped and our preprocessor_config.json. The result loads with ``nvlm.from_pretrained``.
* ``to_release`` (ours → release): what vLLM's ``NVLM_D`` loader and the release's own modeling code read: a
  config.json with the release's key set (original InternViT field names, legacy rope names; ``auto_map``,
  ``_commit_hash`` and the 4.39-era ``llm_config`` keys of the release the model came from, or of
  ``--remote-code-from RELEASE_DIR``, whose .py files are copied beside the export), sharded
  safetensors with an index, InternViT padded with 7 zero dummy heads (vLLM hard-codes 7), the tokenizer with a
  chat template, and a CLIP-style preprocessor_config.json. Only what vLLM can serve is exported: NVLM-D, an
  InternViT tower, 1-D text tags, the MLP projector at the LLM's FFN width; anything else is refused, saying why.

Both directions copy bytes (same dtypes), so release → ours → release is bit-exact on every tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from nvlm.config import NVLMConfig
from nvlm.interop import keymap
from nvlm.interop.internvit import (
    RELEASE_DUMMY_HEADS,
    pad_dummy_heads,
    padded_shape,
    side,
    sliced_shape,
    take_real_heads,
)
from nvlm.interop.release import exportable, load_config, read_json, release_config, with_release_keys
from nvlm.interop.shards import (
    DTYPES,
    OutTensor,
    TensorRef,
    folder_tensors,
    read_header,
    write_file,
    write_sharded,
)
from nvlm.vision.tiling import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SHARD_BYTES = 5 * 10**9
RELEASE_CONFIG = "release_config.json"  # in our format: the release's config.json a model was converted from
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


class _Reader:
    """Reads tensors, keeping the last one: a fused qkv is read once for its three parts."""

    def __init__(self) -> None:
        self._last: tuple[TensorRef, Any] | None = None

    def read(self, ref: TensorRef) -> Any:
        if self._last is None or self._last[0] != ref:
            self._last = None  # drop the old tensor before reading the new one
            self._last = (ref, ref.read())
        return self._last[1]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "ours",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    remote_code_from: str | os.PathLike | None = None,
) -> Path:
    """Convert the folder `src` into `dst` (a new or empty folder): ``to="ours"`` or ``to="release"``.
    `remote_code_from` (``to="release"``): a release folder whose .py files are copied beside the export and
    whose config.json gives the key set (``auto_map`` included), so the export loads as the release does."""
    from nvlm.interop.release import is_release

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; give a release-layout folder or an nvlm checkpoint")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; give a new folder")
    ours = (src / "llm").is_dir()
    if remote_code_from is not None and (to != "release" or not is_release(remote_code_from)):
        raise ValueError(
            f"--remote-code-from {remote_code_from}: give the released NVLM-D folder (config.json of model_type "
            "NVLM_D and its .py files), with --to release"
        )
    if to == "ours":
        if not is_release(src):
            raise ValueError(
                f"{src} is not in the release layout (model_type NVLM_D)"
                + ("; it already is an nvlm checkpoint" if ours else "")
            )
        return to_ours(src, dst, max_shard_bytes)
    if to == "release":
        if not ours:
            raise ValueError(
                f"{src} is not an nvlm checkpoint (config.json and llm/)"
                + ("; it already is in the release layout" if is_release(src) else "")
            )
        return to_release(src, dst, max_shard_bytes, Path(remote_code_from) if remote_code_from else None)
    raise ValueError(f"--to must be 'ours' or 'release', got {to!r}")


# ---- release → ours ----------------------------------------------------------------------------------------------
# Long on purpose: the conversion's steps in order (config, tensors one at a time, tokenizer, checks).
def to_ours(src: Path, dst: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    from transformers import AutoConfig, InternVLVisionConfig

    from nvlm.interop.release import llm_config_from_release

    cfg = load_config(src)
    release = read_json(src / "config.json")
    vit = InternVLVisionConfig(**cfg.vision.hf_config)
    heads, head_dim = vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads
    reader = _Reader()
    parts: dict[str, list[OutTensor]] = {"llm.": [], "vision.model.": [], "projector.": []}
    refs = sorted(folder_tensors(src).values(), key=lambda r: (str(r.file), r.start))  # sequential reads
    for ref in refs:
        try:
            targets = keymap.release_to_ours(ref.name)
        except KeyError:
            raise ValueError(f"{src}: weight {ref.name!r} is not part of NVLM-D's release layout") from None
        for m in targets:
            prefix = next(p for p in parts if m.name.startswith(p))
            name = m.name if prefix == "projector." else m.name[len(prefix) :]

            def make(ref: TensorRef = ref, m: keymap.Mapped = m) -> Any:
                return take_real_heads(reader.read(ref), m, heads, head_dim, f"{src.name}:{ref.name}")

            parts[prefix].append(OutTensor(name, ref.dtype, sliced_shape(m.kind, ref.shape, heads, head_dim), make))
    _check_names(cfg, {p + t.name if p != "projector." else t.name for p, ts in parts.items() for t in ts}, src)
    dtype = _dtype_name(parts["llm."][0].dtype)
    write_sharded(dst / "llm", parts["llm."], max_shard_bytes)
    write_sharded(dst / "vision", parts["vision.model."], max_shard_bytes)
    write_file(dst / "model.safetensors", parts["projector."], {"format": "pt", "nvlm_arch": "D"})
    llm = llm_config_from_release(release["llm_config"])
    llm_json = AutoConfig.for_model(llm.pop("model_type"), **llm).to_dict()
    _write_json(
        dst / "llm" / "config.json",
        {**llm_json, "architectures": release["llm_config"]["architectures"], "dtype": dtype},
    )
    _write_json(
        dst / "vision" / "config.json",
        {
            **vit.to_dict(),
            "architectures": ["InternVLVisionModel"],
            "dtype": _dtype_name(parts["vision.model."][0].dtype),
        },
    )
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "llm" / "generation_config.json")
    cfg.save(dst / "config.json")
    _write_json(dst / RELEASE_CONFIG, release)  # the key set an export back to the release layout keeps
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    tile = side(vit.image_size)
    per_tile = int((tile // side(vit.patch_size) * cfg.vision.downsample) ** 2)
    _write_json(
        dst / "preprocessor_config.json",
        {
            "tile_size": tile,
            "tokens_per_tile": per_tile,
            "image_mean": list(cfg.vision.image_mean or IMAGENET_MEAN),  # set from the release's preprocessor
            "image_std": list(cfg.vision.image_std or IMAGENET_STD),
            "min_tiles": cfg.tiling.min_tiles,
            "max_tiles": cfg.tiling.max_tiles,
            "use_thumbnail": cfg.tiling.use_thumbnail,
        },
    )
    return dst


def _check_names(cfg: NVLMConfig, names: set[str], src: Path) -> None:
    """The converted names must be exactly NVLM-D's (transformers would quietly initialise missing ones)."""
    from nvlm.models.build import meta_model

    want = set(meta_model(cfg).state_dict())
    if names != want:
        raise ValueError(f"{src}: weights missing {sorted(want - names)[:5]}, unexpected {sorted(names - want)[:5]}")


# ---- ours → release ----------------------------------------------------------------------------------------------
def to_release(
    src: Path, dst: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, remote_code_from: Path | None = None
) -> Path:
    cfg = NVLMConfig.load(src / "config.json")
    llm_json, vit_json = read_json(src / "llm" / "config.json"), read_json(src / "vision" / "config.json")
    why = exportable(cfg, llm_json)
    if why:
        raise ValueError("cannot export to the release layout: " + "; ".join(why))
    heads = vit_json["num_attention_heads"]
    head_dim = vit_json["hidden_size"] // heads
    flat = dict(read_header(src / "model.safetensors"))
    flat.update({"llm." + n: r for n, r in folder_tensors(src / "llm").items()})
    flat.update({"vision.model." + n: r for n, r in folder_tensors(src / "vision").items()})
    groups: dict[str, tuple[str | None, dict[str | None, TensorRef]]] = {}
    for name, ref in flat.items():
        try:
            m = keymap.ours_to_release(name)
        except KeyError:
            raise ValueError(f"{src}: weight {name!r} has no place in the release layout") from None
        groups.setdefault(m.name, (m.kind, {}))[1][m.part] = ref
    reader, tensors = _Reader(), []
    order = ("vision_model.", "mlp1.", "language_model.")
    for name in sorted(groups, key=lambda n: next(i for i, p in enumerate(order) if n.startswith(p))):
        kind, got = groups[name]
        refs = [got[p] for p in keymap.QKV_PARTS] if kind == "qkv" else [got[None]]

        def make(kind: str | None = kind, refs: list[TensorRef] = refs) -> Any:
            return pad_dummy_heads(kind, [reader.read(r) for r in refs], heads, head_dim, RELEASE_DUMMY_HEADS)

        shape = padded_shape(kind, refs[0].shape, heads, head_dim, RELEASE_DUMMY_HEADS)
        tensors.append(OutTensor(name, refs[0].dtype, shape, make))
    dtype = _dtype_name(flat["llm.model.embed_tokens.weight"].dtype)
    write_sharded(dst, tensors, max_shard_bytes, always_index=True)
    base = read_json((remote_code_from or src) / ("config.json" if remote_code_from else RELEASE_CONFIG))
    _write_json(dst / "config.json", with_release_keys(release_config(cfg, llm_json, vit_json, dtype), base))
    if remote_code_from is not None:
        for code in sorted(remote_code_from.glob("*.py")):  # copied, never imported
            shutil.copyfile(code, dst / code.name)
    tile = vit_json["image_size"][0] if isinstance(vit_json["image_size"], list) else vit_json["image_size"]
    _write_json(
        dst / "preprocessor_config.json",
        {
            "crop_size": tile,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "resample": 3,
            "size": tile,
        },
    )
    _export_tokenizer(src, dst)
    if (src / "llm" / "generation_config.json").is_file():
        shutil.copyfile(src / "llm" / "generation_config.json", dst / "generation_config.json")
    return dst


def _export_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer as saved with the model, with a ChatML chat template if it has none (`vllm serve` needs one)."""
    from nvlm.models.llm import load_tokenizer

    tok = load_tokenizer(src)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(dst)


def _dtype_name(safetensors_dtype: str) -> str:
    return str(DTYPES[safetensors_dtype]).removeprefix("torch.")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
