"""DPO (Rafailov et al., 2023): the policy learns from preference pairs against a frozen reference, no reward model.

For a prompt x with a chosen answer y_w and a rejected one y_l, with log π(y|x) summed over the answer's tokens:

    loss = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

averaged over the step's pairs. The reference is the starting model, and its log-probabilities are computed once
for every pair when the step is made, before the first update (and before a resumed run loads its checkpoint):
no second copy of the model is kept, and with LoRA the reference is the starting model too, not the base LLM
under a projector that has trained meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from nvlm.distributed.parallel import World, all_reduce, grad_norm
from nvlm.rl.grpo import token_logprobs
from nvlm.rl.pairs import Pair, PairRecord, encode_pair
from nvlm.rl.rollout import with_completion
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

    def __init__(self, model: Any, processor: Any, cfg: Any, world: World, records: list[PairRecord]) -> None:
        self.model, self.processor, self.cfg, self.world = model, processor, cfg, world
        self.stats: dict[str, float] = {}
        self.ref_cache = self.reference_logprobs(records)  # pair index → the reference's (chosen, rejected)

    def batch(self, pairs: list[Pair]) -> dict[str, Any]:
        """Rows 2i and 2i+1: pair i's prompt with its chosen and its rejected answer (right padded)."""
        rows = [with_completion(p.prompt, ids) for p in pairs for ids in (p.chosen, p.rejected)]
        return self.processor.collate(rows, padding_side="right")

    def reference_logprobs(self, records: list[PairRecord]) -> dict[int, tuple[float, float]]:
        """Every pair's (chosen, rejected) log-probs under the model as it is now, `micro_batch_size` pairs a
        forward (every process computes all of them: under FSDP they take the same forwards)."""
        out: dict[int, tuple[float, float]] = {}
        mb, was_training = self.cfg.train.micro_batch_size, self.model.training
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(records), mb):
                pairs = [
                    encode_pair(self.processor, r, i + j, self.cfg.data.system)
                    for j, r in enumerate(records[i : i + mb])
                ]
                batch = self.batch(pairs)
                summed = answer_logprobs(*token_logprobs(self.model, batch)).view(-1, 2)  # [pairs, 2]
                out.update({p.index: (c, r) for p, (c, r) in zip(pairs, summed.tolist(), strict=True)})
        self.model.train(was_training)
        return out

    def __call__(self, pairs: list[Pair], step: int, optimizer: torch.optim.Optimizer) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        model, w, mb = self.model, self.world, self.cfg.train.micro_batch_size
        (total,) = all_reduce([float(len(pairs))], w)
        model.train()
        loss_sum, wins, margin, tokens = 0.0, 0.0, 0.0, 0
        for i in range(0, len(pairs), mb):
            chunk = pairs[i : i + mb]
            batch = self.batch(chunk)
            ref = torch.tensor([self.ref_cache[p.index] for p in chunk])
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
