"""Where a model's weights come from: one place that tells the formats apart, above the model and the interop.

``nvlm.build`` composes a new model from backbone folders (or configs); ``nvlm.load`` reads a saved one, in
nvlm's own format (``nvlm.models.saving``) or the released NVLM-D-72B layout (``nvlm.interop.release``), and
returns the model with its processor (``nvlm.data.processor``), which lives beside the model, not inside it.
Every path builds the model the one way (``nvlm.models.build.skeleton``: backbones on the meta device) and then
fills it: from safetensors folders (``nvlm.models.fill``; a training run sharded over processes fills its own
blocks the same way), from the release's shards, or with a tower already read (an original InternViT folder,
renamed and sliced by ``nvlm.interop.internvit``). Remote code is never run; no pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from nvlm.config import NVLMConfig
from nvlm.data.processor import Processor, add_nvlm_tokens
from nvlm.errors import UserError
from nvlm.interop.internvit import is_original, load_original, original_vision_config, vit_config_from_original
from nvlm.interop.keymap import INTERNVL_HF_VISION_PREFIXES
from nvlm.models import fill
from nvlm.models.build import meta_model, new_config, saved_dtype, skeleton
from nvlm.models.llm import llm_config, load_llm, load_llm_config, load_tokenizer, resize_embeddings
from nvlm.models.lora import ADAPTERS, load_adapters, merge_adapters
from nvlm.models.names import backbone_names
from nvlm.models.nvlm import NVLM
from nvlm.vision.encoder import VisionKind, VisionTower, kind_of, vision_config, vision_model_from_config


@dataclass
class Unfilled:
    """A skeleton, its processor, and where its meta weights are: what a loader fills, whole or sharded."""

    model: NVLM
    processor: Processor
    folders: fill.Folders
    seed: int | None = None  # the added embedding rows' (a new model's)

    def plan(self) -> fill.Plan | None:
        return fill.plan(self.model, self.folders, self.seed)


# ---- a new model from backbones ----------------------------------------------------------------------------------
def build(
    arch: str = "D",
    llm: Any = None,
    vision: Any = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> tuple[NVLM, Processor]:
    """Compose NVLM-`arch` from a local HF LLM folder (or config) and a vision encoder folder (or config);
    returns the model and its processor.

    `tokenizer` defaults to the LLM folder. `overrides` are dotted config keys with dots as double
    underscores or a dict under `config=`: ``build("X", llm, vision, tags__style="2d_grid", xattn__every=4)``.
    """
    flat = dict(overrides.pop("config", {}))
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    unfilled = new_model(arch, llm, vision, tokenizer, flat)
    model = fill_whole(unfilled, llm)
    if dtype is not None:
        model.to(dtype)
    return model, unfilled.processor


def new_model(arch: str, llm: Any, vision: Any, tokenizer: Any, overrides: dict[str, Any]) -> Unfilled:
    """The skeleton of a new NVLM-`arch` over backbones given as folders or config objects: NVLM's tokens added
    to the tokenizer, the LLM's embeddings grown to it, its own modules drawn from the global random stream."""
    if llm is None or vision is None:
        raise ValueError("nvlm.build needs llm= (a local HF model folder or config) and vision= (same)")
    if isinstance(llm, (str, os.PathLike)) and not os.path.isdir(llm):
        raise FileNotFoundError(f"LLM {llm}: not a folder; give a local Hugging Face model folder")
    if tokenizer is None:
        if not isinstance(llm, (str, os.PathLike)):
            raise ValueError("nvlm.build: give tokenizer= (a folder or tokenizer object) when llm is a config")
        tokenizer = llm
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    llm_folder = isinstance(llm, (str, os.PathLike))
    llm_cfg = load_llm_config(llm) if llm_folder else llm_config(llm) if isinstance(llm, dict) else llm
    folders: fill.Folders = {"llm.": (Path(llm), ("",))} if llm_folder else {}
    tower, kind, vision_cfg, vision_folder = _vision_source(vision)
    if vision_folder is not None:
        folders["vision.model."] = (vision_folder, ("", *INTERNVL_HF_VISION_PREFIXES))
    cfg = new_config(arch, llm_cfg, kind, vision_cfg, overrides)
    add_nvlm_tokens(tokenizer, cfg)
    cfg.image_token_id = int(tokenizer.convert_tokens_to_ids(cfg.tags.image_pad))
    model, seed = skeleton(
        cfg,
        vocab_size=len(tokenizer),
        llm_weights=not llm_folder,
        vision=tower,
        vision_weights=vision_folder is None,
        llm_dtype=saved_dtype(_json(Path(llm) / "config.json")) if llm_folder else None,
        vision_dtype=saved_dtype(_json(vision_folder / "config.json")) if vision_folder is not None else None,
    )
    return Unfilled(model, Processor(tokenizer, model.config), folders, seed)


def _vision_source(vision: Any) -> tuple[Any, VisionKind, Any, Path | None]:
    """(a tower already read or None, its kind, its config object, the folder its weights are in or None)."""
    if not isinstance(vision, (str, os.PathLike)):  # a PretrainedConfig object: a random tower
        return None, kind_of(vision.model_type, str(vision)), vision, None
    path = Path(vision)
    raw = _vision_json(path)
    if is_original(raw):  # OpenGVLab's remote-code layout: renamed and sliced as it is read, its code never run
        tower = load_original(path, raw)
        return tower, "internvl", tower.config, None
    kind, cfg = load_vision_config(path)
    return None, kind, cfg, path


def load_vision_config(path: str | os.PathLike) -> tuple[VisionKind, Any]:
    """The vision tower's kind and config object from a local folder, reading no weights: a transformers
    vision-only model, the tower of a full SigLIP, CLIP or InternVL-hf model, or an original InternViT (an
    OpenGVLab folder, or an InternVL chat / NVLM-D model's vision_model)."""
    raw = _vision_json(Path(path))
    if is_original(raw):
        return "internvl", vision_config("internvl", **vit_config_from_original(original_vision_config(raw)))
    if raw.get("model_type") == "internvl":
        raw = raw["vision_config"]
    elif raw.get("model_type") in ("siglip", "clip"):  # a full two-tower model: its vision half
        raw = {"model_type": f"{raw['model_type']}_vision_model", **raw.get("vision_config", {})}
    kind = kind_of(raw.get("model_type", ""), str(path))
    return kind, vision_config(kind, **{k: v for k, v in raw.items() if k != "model_type"})


def load_vision_model(source: str | os.PathLike | Any) -> tuple[VisionTower, VisionKind]:
    """A vision tower alone, with its weights, from a folder (any kind ``load_vision_config`` reads), or a random
    one from a config object; returns (tower, kind)."""
    tower, kind, cfg, folder = _vision_source(source)
    if tower is not None:
        return tower, kind
    tower = vision_model_from_config(kind, cfg.to_dict())
    if folder is None:
        return tower, kind
    cast(Any, tower).to(saved_dtype(_json(folder / "config.json")) or torch.float32)
    index = fill.tensor_index(folder)
    state: dict[str, torch.Tensor] = {}
    for name in tower.state_dict():
        key = next((p + name for p in ("", *INTERNVL_HF_VISION_PREFIXES) if p + name in index), None)
        if key is not None:
            state[name] = fill.read_tensor(index[key], key)
    missing = sorted(set(tower.state_dict()) - set(state))
    if missing:
        raise ValueError(f"vision encoder {folder}: weights missing for {missing[:5]} ({len(missing)} in all)")
    tower.load_state_dict(state)
    return tower.eval(), kind


def _vision_json(path: Path) -> dict[str, Any]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"vision encoder {path}: no config.json; give a local Hugging Face model folder")
    return _json(path / "config.json")


def fill_whole(unfilled: Unfilled, llm_source: Any = None, device: torch.device | str = "cpu") -> NVLM:
    """Fill an unfilled model on one process, every tensor whole. An LLM folder whose tensor names the plan
    does not find (a layout transformers renames as it loads) is read by transformers instead."""
    model = unfilled.model
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # random backbones: nothing to read
        return model.to(device)
    plan = unfilled.plan()
    if plan is None and isinstance(llm_source, (str, os.PathLike)) and "llm." in unfilled.folders:
        unfilled = _llm_through_transformers(unfilled, llm_source)
        plan = unfilled.plan()
    if plan is None:
        where = ", ".join(sorted(str(folder) for folder, _ in unfilled.folders.values()))
        raise ValueError(f"weights of the model are missing in {where} (or have other shapes)")
    model.to_empty(device=device)
    model.llm.tie_weights()  # to_empty gives tied weights storage of their own: tie them again before filling
    fill.load(model, plan)
    return model


def _llm_through_transformers(unfilled: Unfilled, llm_source: Any) -> Unfilled:
    """The skeleton with its LLM read by transformers (real), its added rows drawn from the skeleton's seed."""
    model = unfilled.model
    real = load_llm(llm_source, next(model.llm.parameters()).dtype)
    resize_embeddings(real, model.llm.get_input_embeddings().weight.shape[0], seed=unfilled.seed)
    state = backbone_names(model, real.state_dict(), root=model.llm, reverse=True)  # x-attn wrappers' names
    model.llm.load_state_dict(state, assign=True)
    model.llm.tie_weights()
    folders = {k: v for k, v in unfilled.folders.items() if k != "llm."}
    return Unfilled(model, unfilled.processor, folders, unfilled.seed)


# ---- a saved model ------------------------------------------------------------------------------------------------
def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    quantize_keep: tuple[str, ...] | None = None,
) -> tuple[NVLM, Processor]:
    """The model saved at `path` and its processor: nvlm's format (``model.save_pretrained`` with
    ``processor.save_pretrained``), a folder in the released NVLM-D-72B layout, or a quantized folder
    (``nvlm quantize``). `quantize` ("int8", "int4", "fp8"): weight-only quantization of the LLM's Linears
    (``nvlm.inference.quantize``), applied to each as it is read, the modules under `quantize_keep`'s
    prefixes left in `dtype` (default: the vision tower, projector, resampler and LM head)."""
    from nvlm.inference import quantized_io
    from nvlm.inference.quantize import Quantizer, check_scheme
    from nvlm.inference.schemes import DEFAULT_KEEP
    from nvlm.interop.release import is_release, load_release

    root = Path(path)
    target = torch.device(device) if device is not None else torch.device("cpu")
    if quantized_io.is_quantized_folder(root):
        if quantize is not None:
            raise UserError(f"{root} is already quantized; load it without --quantize")
        return _load_quantized(root, dtype, target)
    keep = DEFAULT_KEEP if quantize_keep is None else tuple(quantize_keep)
    if not (root / "llm").is_dir() and is_release(root):
        return load_release(root, dtype, device, quantize=check_scheme(quantize), keep=keep)
    unfilled = saved_model(root)
    if check_scheme(quantize) is None:
        model = fill_whole(unfilled, device=target)
        load_adapters(model, root)  # an adapter checkpoint (LoRA): applied at load time, not merged
        if dtype is not None:
            model.to(dtype)
        return model, unfilled.processor
    assert quantize is not None
    if any((root / folder / "adapter_config.json").is_file() for folder in ADAPTERS.values()):
        raise UserError(f"{root} holds LoRA adapters; fold them in first (nvlm merge SRC DST), then quantize DST")
    model = unfilled.model
    quantizer = Quantizer(model, quantize, keep, dtype, target)
    plan = unfilled.plan()
    if plan is None:  # a layout only transformers reads: filled whole on the host, then quantized
        model = fill_whole(unfilled, root / "llm", device=target)
    else:  # one module at a time on the device, each quantized before the next is read
        fill.load(model, plan, device=target, after=quantizer.module_filled)
        model.llm.tie_weights()
    quantizer.quantize_rest(model)
    return model, unfilled.processor


def _load_quantized(root: Path, dtype: torch.dtype | None, device: torch.device) -> tuple[NVLM, Processor]:
    """A folder written by ``nvlm quantize``: the skeleton filled with the rebuilt quantized tensors."""
    from nvlm.inference import quantized_io
    from nvlm.inference.quantize import is_quantized

    unfilled = saved_model(root)
    model = unfilled.model
    state = quantized_io.read_state(root, device)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{root}: weights missing for {missing[:5]} ({len(missing)} in all)")
    model.load_state_dict(state, assign=True)
    model.llm.tie_weights()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_quantized(p):
                p.requires_grad_(False)
            elif dtype is not None and p.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
    for module in model.modules():  # buffers (RoPE's inv_freq) are no weights: made on the host
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = b.to(device)
    return model.eval(), unfilled.processor


def model_config(path: str | os.PathLike) -> NVLMConfig:
    """The NVLMConfig of the model saved at `path` (nvlm's format, quantized or not, or the release layout),
    reading no weights and no tokenizer."""
    from nvlm.interop.release import is_release, load_config

    root = Path(path)
    if not (root / "llm").is_dir() and is_release(root):
        return load_config(root)
    if not (root / "config.json").is_file():
        raise UserError(f"{root}: no config.json; give a folder written by save_pretrained or the release")
    return NVLMConfig.load(root / "config.json")


def from_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    quantize_keep: tuple[str, ...] | None = None,
) -> NVLM:
    """The model of ``load(path)``, without its processor."""
    return load(path, dtype, device, quantize, quantize_keep)[0]


def saved_model(path: str | os.PathLike) -> Unfilled:
    """The skeleton of the model saved at `path` in nvlm's format, and where its weights are. A released
    NVLM-D folder gives a skeleton with no folders: its weights are renamed as they are read (``load``)."""
    root = Path(path)
    from nvlm.interop.release import is_release, release_processor

    if not (root / "llm").is_dir() and is_release(root):
        processor = release_processor(root)
        return Unfilled(meta_model(processor.config), processor, {})
    if not (root / "config.json").is_file() or not (root / "llm").is_dir():
        raise FileNotFoundError(
            f"{root} is not an nvlm checkpoint (needs config.json and llm/); "
            "write one with model.save_pretrained(path) and processor.save_pretrained(path)"
        )
    cfg = NVLMConfig.load(root / "config.json")
    tokenizer = load_tokenizer(root) if (root / "tokenizer_config.json").is_file() else None
    if tokenizer is None:
        raise FileNotFoundError(f"{root}: no tokenizer there; save the processor too: processor.save_pretrained")
    if cfg.image_token_id is None:  # a checkpoint from before the id was kept in the config
        cfg.image_token_id = int(tokenizer.convert_tokens_to_ids(cfg.tags.image_pad))
    model, _ = skeleton(
        cfg,
        own_weights=False,
        llm_dtype=saved_dtype(_json(root / "llm" / "config.json")),
        vision_dtype=saved_dtype(_json(root / "vision" / "config.json")),
    )
    folders: fill.Folders = {
        "llm.": (root / "llm", ("",)),
        "vision.model.": (root / "vision", ("",)),
        "": (root, ("",)),
    }
    return Unfilled(model, Processor(tokenizer, model.config), folders)


def merge_checkpoint(src: str | Path, dst: str | Path) -> None:
    """``nvlm merge``: load an adapter checkpoint, fold its adapters in, save it as a plain nvlm checkpoint."""
    if not any((Path(src) / folder / "adapter_config.json").is_file() for folder in ADAPTERS.values()):
        raise UserError(f"{src}: no LoRA adapters there (no llm_adapter/adapter_config.json); nothing to merge")
    model, processor = load(src)
    merge_adapters(model)
    model.save_pretrained(str(dst))
    processor.save_pretrained(str(dst))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
