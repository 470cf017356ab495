"""What trains in which stage (paper §4.5, Tables 10–11): the one place that decides freezing.

    stage        D                   X                                   H
    pretrain     projector           projector + x-attn                  projector + x-attn
    sft          projector + LLM     projector + x-attn + LLM            projector + x-attn + LLM
    grpo, dpo    as sft              as sft                              as sft

The optional Perceiver resampler (Appendix C, off by default) trains wherever the projector does, as Flamingo's.
The vision encoder is frozen in both stages (``unfreeze_vision=True`` for weak encoders); NVLM-X's SFT can keep
the LLM frozen (``freeze_llm=True``, the Llama 3-V choice the paper argues against in §4.3). A model with PEFT
LoRA adapters (``nvlm.models.lora``, ``train.lora``) trains only the adapters of its LLM (and of its vision
tower, when that has some) where the component would train in full; the base weights stay frozen. The
reinforcement-learning stages after SFT (``nvlm.rl``: GRPO, DPO) train what SFT trains, LoRA included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from nvlm.models.lora import has_adapters, is_adapter_param

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM

STAGES = ("pretrain", "sft", "grpo", "dpo")


def components(model: NVLM) -> dict[str, nn.Module]:
    out = {"vision": model.vision, "projector": model.projector, "xattn": model.xattn, "llm": model.llm}
    if model.resampler is not None:  # an alignment module like the projector: trains in both stages
        out["resampler"] = model.resampler
    return out


def apply_stage(model: NVLM, stage: str, *, freeze_llm: bool = False, unfreeze_vision: bool = False) -> None:
    """Set ``requires_grad`` on every parameter for `stage` ("pretrain" = stage 1, "sft" = stage 2, "grpo" and
    "dpo" as "sft")."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (stage 1 = pretrain, stage 2 = sft, then RL), got {stage!r}")
    trains = {
        "vision": unfreeze_vision,
        "projector": True,
        "resampler": True,
        "xattn": True,
        "llm": stage != "pretrain" and not freeze_llm,
    }
    if has_adapters(model.vision):
        trains["vision"] = True
    for name, module in components(model).items():
        if trains[name] and has_adapters(module):
            for pname, p in module.named_parameters():
                p.requires_grad_(is_adapter_param(pname))
        else:
            module.requires_grad_(trains[name])


def trainable_table(model: NVLM) -> str:
    """A table of trainable and frozen parameters per component."""
    rows = [f"{'component':<10} {'trainable':>14} {'frozen':>14}"]
    total_t = total_f = 0
    for name, module in components(model).items():
        t = sum(p.numel() for p in module.parameters() if p.requires_grad)
        f = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        total_t, total_f = total_t + t, total_f + f
        rows.append(f"{name:<10} {t:>14,} {f:>14,}")
    rows.append(f"{'total':<10} {total_t:>14,} {total_f:>14,}")
    return "\n".join(rows)
