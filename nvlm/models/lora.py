"""LoRA adapters on NVLM's backbones through Hugging Face PEFT (LoRA: Hu et al., 2021; rsLoRA; DoRA).

PEFT's ``inject_adapter_in_model`` replaces the LLM's targeted ``nn.Linear`` layers in place by LoRA layers
(``q_proj`` → ``q_proj.base_layer`` + ``q_proj.lora_A/lora_B``), without a ``PeftModel`` wrapper, so ``NVLM.llm``
stays the causal LM every other part of nvlm calls. In special-token tag mode the tags' embedding rows train as
PEFT *trainable tokens* (``trainable_token_indices``: a delta for those rows only; the rest of the table is
frozen). The projector and the x-attn blocks are not under ``NVLM.llm`` (a ``CrossAttentionDecoderLayer``
registers only the HF layer) and keep training in full.

On disk an adapter checkpoint is an ordinary nvlm checkpoint of the *base* weights plus ``llm_adapter/`` in
PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``, keys under the plain HF LLM's names,
so ``PeftModel.from_pretrained(llm, "ckpt/llm_adapter")`` loads it) and, with ``train.lora.vision``,
``vision_adapter/`` for the vision tower. ``from_pretrained`` applies them at load time; ``merge`` folds them in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nvlm.config import ConfigError
from nvlm.data.tags import all_tags
from nvlm.errors import UserError
from nvlm.models.llm import decoder_layers
from nvlm.models.names import backbone_names
from nvlm.vision.encoder import tile_geometry

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTERS = {"llm": "llm_adapter", "vision": "vision_adapter"}  # component → folder in a checkpoint
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's names
GROUPS = ("attn", "mlp")


def is_adapter_param(name: str) -> bool:
    """A parameter PEFT added (LoRA A/B, DoRA magnitude, trainable-token delta), not a base weight."""
    return any(k in name for k in (".lora_", "lora_magnitude_vector", "trainable_tokens_delta"))


def has_adapters(module: nn.Module) -> bool:
    if "peft" not in sys.modules:  # never imported: no module can be one of its layers (peft loads in seconds)
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def target_names(layer: nn.Module, targets: str) -> list[str]:
    """The leaf names of `layer`'s linear layers that `targets` ("attn,mlp" or leaf names) selects. Leaf names
    (``q_proj``) match every decoder layer alike, wrapped by a ``CrossAttentionDecoderLayer`` or not, so the
    saved ``adapter_config.json`` selects the same layers on the plain HF LLM."""
    linears = [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for t in (t.strip() for t in targets.split(",") if t.strip()):
        hit = [n for n in linears if (t in GROUPS and t in n.split(".")[0]) or n.rsplit(".", 1)[-1] == t]
        if not hit:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"train.lora.targets: {t!r} matches no linear layer; use attn, mlp or one of {leaves}")
        chosen |= {n.rsplit(".", 1)[-1] for n in hit}
    return sorted(chosen)


def tag_token_ids(tokenizer: Any, config: Any) -> list[int]:
    """Ids of the tokens special-token tag mode added (image start/end markers, tile tags); [] in text mode.
    Without a tokenizer (a weight-less dry run) as many placeholder ids, for counting."""
    t = config.tags
    if t.mode != "special":
        return []
    size, _ = tile_geometry(config.vision.hf_config, config.vision.downsample)
    tags = all_tags(t.style, t.thumbnail_tag, size, config.tiling.min_tiles, config.tiling.max_tiles)
    tokens = [t.image_start, t.image_end, *tags]
    if tokenizer is None:
        return list(range(len(tokens)))
    return sorted(set(tokenizer.convert_tokens_to_ids(tokens)))


def peft_config(spec: Any, model: Any, component: str = "llm", tokenizer: Any = None) -> LoraConfig:
    """PEFT's LoraConfig for `spec` (``train.lora``) on the LLM or the vision tower; `tokenizer`: the
    processor's, whose tag tokens' embedding rows train (``tag_token_ids``)."""
    from peft import LoraConfig

    if component == "llm":
        layer = decoder_layers(model.llm)[0]
        layer = getattr(layer, "layer", layer)  # a CrossAttentionDecoderLayer: the HF layer inside
        embed = next(n for n, m in model.llm.named_modules() if m is model.llm.get_input_embeddings())
        tags = tag_token_ids(tokenizer, model.config)
        tokens = {embed.rsplit(".", 1)[-1]: tags} if tags else None
        targets = target_names(layer, spec.targets)
    else:  # the vision tower: every linear layer inside its encoder layers (not a pooling head)
        linears = [n for n, m in _vision(model).named_modules() if isinstance(m, nn.Linear) and ".layer" in n]
        tokens, targets = None, sorted({n.rsplit(".", 1)[-1] for n in linears})
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_rslora=spec.rslora,
        use_dora=spec.dora,
        trainable_token_indices=tokens,
    )


def _vision(model: Any) -> nn.Module:
    return model.vision.model


def _target(model: Any, component: str) -> nn.Module:
    return model.llm if component == "llm" else _vision(model)


def apply_lora(model: Any, spec: Any, tokenizer: Any = None) -> None:
    """Inject `spec`'s adapters into `model` (in place; the LLM, and the vision tower with ``spec.vision``).
    `tokenizer`: the processor's (see ``peft_config``). Which parameters then train is decided by
    ``nvlm.training.stages.apply_stage``."""
    if has_adapters(model):
        raise UserError("the model already holds LoRA adapters (an adapter checkpoint): `nvlm merge` it first")
    from peft import inject_adapter_in_model

    for component in ("llm", "vision") if spec.vision else ("llm",):
        config = peft_config(spec, model, component, tokenizer)
        inject_adapter_in_model(config, _target(model, component))  # also sets its .peft_config {"default": …}


def base_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a state dict with adapters, under the names the model had before injection (the
    adapters themselves are saved apart, by ``save_adapters``)."""
    out = {}
    for k, v in state.items():
        if not is_adapter_param(k):
            out[k.replace(".base_layer.", ".").replace(".token_adapter.", ".")] = v
    return out


def save_adapters(model: Any, out: Path, state: dict[str, torch.Tensor]) -> None:
    """Write each component's adapters in PEFT's format from `state` (the full model's state dict, under
    NVLM's names), keyed as ``PeftModel.save_pretrained`` keys them on the plain HF backbone."""
    from peft.utils import get_peft_model_state_dict

    for component, folder in ADAPTERS.items():
        module = _target(model, component)
        config = getattr(module, "peft_config", {}).get("default")  # set by inject_adapter_in_model
        if config is None:
            continue
        prefix = "llm." if component == "llm" else "vision.model."
        mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        # PEFT picks the adapter's tensors by the modules' names, so the x-attn wrappers' names are mapped back
        # to the plain HF LLM's only afterwards
        adapter = get_peft_model_state_dict(module, state_dict=mine, adapter_name="default")
        if component == "llm":
            adapter = backbone_names(model, adapter, root=module)
        (out / folder).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out / folder))
        tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.items()}
        save_file(tensors, str(out / folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapters(model: Any, root: Path) -> None:
    """Apply the adapters a checkpoint folder holds (if any) to `model`, built from its base weights."""
    for component, folder in ADAPTERS.items():
        path = root / folder
        if not (path / "adapter_config.json").is_file():
            continue
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        config = LoraConfig.from_pretrained(str(path))
        if json.loads((path / "adapter_config.json").read_text()).get("peft_type") != "LORA":
            raise UserError(f"{path}: not a LoRA adapter (peft_type must be LORA)")
        module = _target(model, component)
        inject_adapter_in_model(config, module)
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
        if component == "llm":
            state = backbone_names(model, state, root=module, reverse=True)
        result: Any = set_peft_model_state_dict(module, state, adapter_name="default")  # (missing, unexpected)
        if result.unexpected_keys:
            raise UserError(f"{path}: adapter keys that match no layer, e.g. {result.unexpected_keys[:3]}")


def merge_adapters(model: Any) -> None:
    """Fold every adapter into its base weight and put the plain layers back (``W + scale · B A``; the trainable
    tokens' rows into the embedding table): the model is then an ordinary NVLM model."""
    for component in ADAPTERS:
        module = _target(model, component)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        tops: list[str] = []
        for name, m in module.named_modules():
            if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not any(
                name.startswith(t + ".") for t in tops
            ):
                tops.append(name)
        for name in tops:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            layer: Any = parent.get_submodule(child)
            if isinstance(layer, AuxiliaryTrainingWrapper):
                plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
            else:
                layer.merge(safe_merge=True)
                plain = layer.get_base_layer()
            setattr(parent, child, plain)
        if hasattr(module, "peft_config"):
            del module.peft_config
