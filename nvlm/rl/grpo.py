"""GRPO (Shao et al., 2024, DeepSeekMath §4.1): group-normalised advantages and a clipped, token-level policy loss.

For each prompt G completions are sampled (``nvlm.rl.rollout``) and scored (``nvlm.rl.rewards``); a completion's
advantage is its reward against its group's: (r − mean) / (std + eps), so a group whose completions all earn the
same reward teaches nothing. Every completion token then carries

    −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) + β·KL_k3,      ρ = exp(log π − log π_old)

where π_old is the policy that sampled (the weights before this rollout batch's first update: ρ = 1 there, and
the clip bites only in later updates of the same batch) and KL_k3 = exp(d) − d − 1, d = log π_ref − log π, is
Schulman's unbiased, non-negative estimator of the KL to a frozen reference (β = ``kl_coef``, 0 by default).
The loss is summed over completion tokens and divided by the step's completion tokens (token-level, as DAPO:
long and short completions weigh by their tokens); prompts and padding carry none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[B·G] rewards, prompt-major → [B·G] advantages (r − group mean) / (group std + eps); the std is unbiased
    (Bessel), as TRL's GRPO."""
    r = rewards.float().view(-1, group_size)  # [B, G]
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def token_logprobs(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token) of every next token of a right-padded batch [B, T−1], and where it counts (its label is set:
    the completion) as a bool mask [B, T−1]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()  # [B, T−1, vocab]: position t predicts token t+1
    target = batch["input_ids"][:, 1:].to(logits.device)
    logp = logits.gather(-1, target[..., None])[..., 0] - logits.logsumexp(-1)
    return logp, (batch["labels"][:, 1:] != -100).to(logits.device)


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # summed over completion tokens (divide by the step's tokens)
    clipped: float  # tokens where the clipped term was the smaller one
    kl_sum: float  # summed k3 KL over completion tokens (0 without a reference)
    tokens: int


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossParts:
    """The clipped surrogate (+ β·k3 KL) summed over `mask`ed tokens; `logp`, `old_logp`, `ref_logp`: [B, L],
    `advantages` [B]."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)  # [B, 1]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    m = mask.to(logp.dtype)
    return LossParts(
        loss_sum=(per_token * m).sum(),
        clipped=float(((clipped < unclipped) & mask).sum()),
        kl_sum=float((kl.detach() * m).sum()),
        tokens=int(mask.sum()),
    )
