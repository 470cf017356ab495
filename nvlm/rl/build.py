"""The RL step a run trains with: GRPO's (``nvlm.rl.step``) or DPO's (``nvlm.rl.dpo``), made before a resumed run
loads its checkpoint, so that DPO's reference log-probs and GRPO's reference policy are the starting model's."""

from __future__ import annotations

from typing import Any

import torch

from nvlm.distributed.parallel import World
from nvlm.rl.dpo import DPOStep
from nvlm.rl.step import GRPOStep, make_reference
from nvlm.training.build import build_model, run_model
from nvlm.training.config import RunConfig


def rl_step(
    model: Any, processor: Any, cfg: RunConfig, world: World, device: torch.device, pairs: list[Any] | None
) -> GRPOStep | DPOStep:
    """DPO's step over preference `pairs`, else GRPO's; with ``train.rl.kl_coef`` > 0 GRPO's reference is a
    frozen copy of the starting model, built again from the run's model spec."""
    if pairs is not None:
        return DPOStep(model, processor, cfg, world, pairs)
    reference = None
    if cfg.train.rl.kl_coef > 0:
        frozen = build_model(cfg, run_model(cfg))[0].to(device).eval().requires_grad_(False)
        reference = make_reference(frozen)
    return GRPOStep(model, processor, cfg, world, reference)
