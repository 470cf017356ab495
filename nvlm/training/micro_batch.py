"""The micro-batch around the forward: what it becomes before the model sees it and what the step adds after.

Before: every process runs every module (``touch_every_module``: a stand-in tile, a one-token memory), the
host does what would stall the device (``with_host_work``: labelled rows, the image-pad check), packed rows
for FlexAttention get one of a few widths (``widen``; ``packed_attention_kind`` says how packed rows attend).
After: the stand-in tile's features join the loss times zero (``with_unused``) and every trainable parameter
gets a gradient, zero where the step used nothing of its component (``fill_unused_grads``).
"""

from __future__ import annotations

from typing import Any

import torch

import nvlm
from nvlm.models.nvlm import label_rows
from nvlm.training.stages import components


def fill_unused_grads(model: nvlm.NVLM, used: dict[str, bool]) -> list[torch.nn.Parameter]:
    """The trainable parameters, each with a gradient. A component that no sample of the step used (on any
    process: no image → no projector; no image memory → no x-attn block) gets zero gradients, so AdamW still
    steps (momentum, weight decay) as Megatron's grad buffers do, on 1 process as on N. A missing gradient in a
    component the step did use is a wiring bug (a block cut off the graph): raised, never trained on as zeros.
    The vision tower, when unfrozen, may hold heads the NVLM path never runs (a pooling layer)."""
    missing = []
    for name, module in components(model).items():
        for pname, p in module.named_parameters():
            if p.requires_grad and p.grad is None:
                if used[name] and name != "vision":
                    missing.append(f"{name}.{pname}")
                p.grad = torch.zeros_like(p)
    if missing:
        raise RuntimeError(
            f"{len(missing)} trainable tensor(s) of modules this step used got no gradient, e.g. "
            f"{missing[:3]}: the model's graph is broken (a bug, please report it); not training"
        )
    return [p for p in model.parameters() if p.requires_grad]


def touch_every_module(batch: dict[str, Any], model: nvlm.NVLM) -> dict[str, Any]:
    """`batch` changed so that the model runs its vision tower, projector and every x-attn block, with no effect
    on the result: under FSDP every process must call the same modules in the same order (weights are gathered
    collectively; a process that skipped the vision tower while another ran it would wait forever).

    A batch without images gets one blank tile, which the model encodes and returns unused (``unused_features``)
    and ``train_step`` adds times zero to the loss, so backward reaches the tower too; for X/H a batch
    without an image memory gets a one-token memory (the first tile's first token) that no row may see
    (its ranges stay empty), so every block runs and leaves every row unchanged."""
    out = dict(batch)
    if out.get("pixel_values") is None:
        s = model.vision.tile_size
        out["pixel_values"] = torch.zeros(1, 3, s, s)
    if model.xattn and out["memory_index"].numel() == 0:
        out["memory_index"] = torch.zeros(out["input_ids"].shape[0], 1, dtype=torch.long)
    return out


def with_unused(loss: torch.Tensor, out: Any) -> torch.Tensor:
    """`loss` plus the features of tiles nothing used (``touch_every_module``'s stand-in tile) times zero: the
    same value, and backward reaches the vision tower and projector on every process."""
    if out.unused_features is None:
        return loss
    return loss + 0 * out.unused_features.sum().to(loss.dtype)


def packed_attention_kind(packing: bool, attn: str, device_type: str) -> str | None:
    """How packed rows attend when ``train.attn`` is "sdpa": per packed sample (``nvlm.models.packed_attention``:
    one causal SDPA per sample, Σ nᵢ² work) on the CPU; on a GPU transformers' FlexAttention, whose block mask
    it builds once per forward from the restarting position ids (compiled, it skips the masked-out blocks),
    instead of SDPA over a dense [rows, 1, T, T] block-diagonal mask. None: no packing, or another kernel set."""
    if not packing or attn != "sdpa":
        return None
    return "per_sample" if device_type == "cpu" else "flex_attention"


def widen(batch: dict[str, Any], multiple: int, pad_id: int) -> dict[str, Any]:
    """A packed batch (``collate_packed``) right-padded to a width that is a multiple of `multiple`: the added
    tokens are one more packed sample per row (positions from 0, no labels, no image memory), which attends only
    to itself, so the loss is unchanged."""
    rows, width = batch["input_ids"].shape
    extra = -width % multiple
    if extra == 0:
        return batch
    tail = {
        "input_ids": torch.full((rows, extra), pad_id, dtype=torch.long),
        "labels": torch.full((rows, extra), -100, dtype=torch.long),
        "position_ids": torch.arange(extra).expand(rows, extra),
        "xattn_lo": torch.zeros(rows, extra, dtype=torch.long),
        "xattn_hi": torch.zeros(rows, extra, dtype=torch.long),
    }
    return {**batch, **{k: torch.cat([batch[k], v.to(batch[k].dtype)], 1) for k, v in tail.items()}}


def with_host_work(batch: dict[str, Any], model: nvlm.NVLM) -> dict[str, Any]:
    """`batch` with what the model would otherwise work out on the device done here on the host: the labelled
    rows and their targets (``label_rows``) and the image-pad check. Under FSDP every input reaches the model on
    the GPU, where each would stall the host once per micro-batch (a ``nonzero`` and a count)."""
    model.check_image_pads(batch["input_ids"], batch.get("decoder_tiles"))
    return {**batch, "label_rows": label_rows(batch["labels"]), "pads_checked": True}
