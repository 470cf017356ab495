"""DPO (Rafailov et al., 2023): the policy learns from preference pairs against a frozen reference, no reward model.

For a prompt x with a chosen answer y_w and a rejected one y_l, with log π(y|x) summed over the answer's tokens:

    loss = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

averaged over the step's pairs. The reference's log-probabilities are computed once per pair and kept (the
reference never changes): a frozen copy of the starting weights, or with LoRA the model with its adapters off.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from nvlm.distributed.parallel import World, all_reduce, grad_norm
from nvlm.rl.grpo import token_logprobs
from nvlm.rl.pairs import Pair
from nvlm.rl.rollout import with_completion
from nvlm.rl.step import Reference
from nvlm.training.micro_batch import fill_unused_grads


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair [B]: the loss, and the implicit rewards β·(log π − log π_ref) of the chosen and rejected answers."""
    r_chosen, r_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(r_chosen - r_rejected), r_chosen.detach(), r_rejected.detach()


def answer_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] token log-probs and their answer mask → [B] summed over each row's answer."""
    return (logp * mask.to(logp.dtype)).sum(-1)


class DPOStep:
    """One DPO step of the trainer (``train.stage=dpo``) over the pairs it read; returns the global (loss, grad
    norm, answer tokens) for the trainer to apply."""

    def __init__(self, model: Any, processor: Any, cfg: Any, world: World, reference: Reference) -> None:
        self.model, self.processor, self.cfg, self.world, self.reference = model, processor, cfg, world, reference
        self.ref_cache: dict[int, tuple[float, float]] = {}  # pair index → reference (chosen, rejected)
        self.stats: dict[str, float] = {}

    def batch(self, pairs: list[Pair]) -> dict[str, Any]:
        """Rows 2i and 2i+1: pair i's prompt with its chosen and its rejected answer (right padded)."""
        rows = [with_completion(p.prompt, ids) for p in pairs for ids in (p.chosen, p.rejected)]
        return self.processor.collate(rows, padding_side="right")

    def reference_logprobs(self, pairs: list[Pair], batch: dict[str, Any]) -> torch.Tensor:
        """[B, 2] the reference's (chosen, rejected) log-probs, from the cache or computed once and kept."""
        if any(p.index not in self.ref_cache for p in pairs):
            with torch.no_grad():
                summed = answer_logprobs(self.reference(batch), batch["labels"][:, 1:] != -100).view(-1, 2)
            for p, (c, r) in zip(pairs, summed.tolist(), strict=True):
                self.ref_cache.setdefault(p.index, (c, r))
        return torch.tensor([self.ref_cache[p.index] for p in pairs])

    def __call__(self, pairs: list[Pair], step: int, optimizer: torch.optim.Optimizer) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        model, w, mb = self.model, self.world, self.cfg.train.micro_batch_size
        (total,) = all_reduce([float(len(pairs))], w)
        model.train()
        loss_sum, wins, margin, tokens = 0.0, 0.0, 0.0, 0
        for i in range(0, len(pairs), mb):
            chunk = pairs[i : i + mb]
            batch = self.batch(chunk)
            ref = self.reference_logprobs(chunk, batch)
            logp, mask = token_logprobs(model, batch)
            policy = answer_logprobs(logp, mask).view(-1, 2)  # [pairs, (chosen, rejected)]
            ref = ref.to(policy.device, policy.dtype)
            losses, rc, rr = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.cfg.train.rl.beta)
            (losses.sum() * w.dp_size / total).backward()  # FSDP averages over ranks: undo it
            loss_sum += float(losses.detach().sum())
            wins, margin = wins + float((rc > rr).sum()), margin + float((rc - rr).sum())
            tokens += int(mask.sum())
        images = any(p.prompt.pixel_values is not None for p in pairs)
        memory = any(p.prompt.memory for p in pairs)
        used = {"llm": True, "projector": images, "resampler": images, "vision": images,
                "xattn": memory and not model.gate_off}  # fmt: skip
        params = fill_unused_grads(model, used)
        norm = grad_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
        loss_sum, wins, margin, tokens_all = all_reduce([loss_sum, wins, margin, float(tokens)], w)
        self.stats = {"dpo/accuracy": wins / total, "dpo/margin": margin / total, "train_s": time.perf_counter() - t0}
        return loss_sum / total, norm, int(tokens_all)
