"""One GRPO step of the trainer (``train.stage=grpo``): rollouts, rewards, advantages, then the policy updates.

The trainer reads the step's samples as for SFT (the same sources, resume position and bad-sample rules) and
hands them here; each sample becomes a prompt and its last answer the reference. The step returns the global
(loss, grad norm, completion tokens) of its last update, which the trainer applies (``optimizer.step``) as any
other step; with ``updates_per_rollout`` > 1 the earlier updates of the same rollouts are applied here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from nvlm.data.processor import Encoded
from nvlm.distributed.parallel import World, all_reduce, grad_norm
from nvlm.inference.detok import stop_ids
from nvlm.rl.grpo import group_advantages, grpo_loss, token_logprobs
from nvlm.rl.rewards import Completion, score
from nvlm.rl.rollout import rollout, split_answer, with_completion
from nvlm.training.micro_batch import fill_unused_grads

Reference = Callable[[dict[str, Any]], torch.Tensor]
"""A batch → the frozen reference policy's token log-probs [B, T−1]."""


class GRPOStep:
    def __init__(self, model: Any, processor: Any, cfg: Any, world: World, reference: Reference | None) -> None:
        self.model, self.processor, self.cfg, self.world, self.reference = model, processor, cfg, world, reference
        self.rl = cfg.train.rl
        self.eos = stop_ids(processor.tokenizer)
        self.stats: dict[str, float] = {}  # the last step's, for metrics.jsonl

    def prompts(self, samples: list[Encoded]) -> tuple[list[Encoded], list[str]]:
        tok = self.processor.tokenizer
        split = [split_answer(s) for s in samples]
        return [p for p, _ in split], [tok.decode(a, skip_special_tokens=True) for _, a in split]

    def __call__(self, samples: list[Encoded], step: int, optimizer: torch.optim.Optimizer) -> tuple[float, float, int]:
        rl, t, g = self.rl, self.cfg.train, self.rl.group_size
        prompts, references = self.prompts(samples)
        seed = t.seed * 1_000_003 + step * 9_973 + self.world.dp_rank  # a step's draws: the same after a resume
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        ro = rollout(self.model, self.processor, prompts, g, rl.max_new_tokens, temperature=rl.temperature,
                     top_p=rl.top_p, eos_ids=self.eos, generator=generator,
                     fixed_steps=self.world.distributed)  # fmt: skip
        per = [i // g for i in range(len(ro.completions))]
        ids, finished = fit_completions([len(ro.prompt_ids[i]) for i in per], ro.completions, ro.finished,
                                        self.cfg.data.max_seq_len)  # fmt: skip
        tok = self.processor.tokenizer
        completions = [Completion(tok.decode(c, skip_special_tokens=True), f)
                       for c, f in zip(ids, finished, strict=True)]  # fmt: skip
        texts = [tok.decode(p, skip_special_tokens=True) for p in ro.prompt_ids]
        rewards = score(rl.rewards, [texts[i] for i in per], completions, [references[i] for i in per])
        total = torch.tensor([sum(v) for v in zip(*rewards.values(), strict=True)])
        advantages = group_advantages(total, g, rl.adv_eps)
        rows = [with_completion(prompts[i], c) for i, c in zip(per, ids, strict=True)]
        t0 = time.perf_counter()
        out = self._updates(rows, advantages, optimizer)
        self.stats = self._stats(rewards, ids, ro.seconds, time.perf_counter() - t0)
        return out

    def _batches(self, rows: list[Encoded], advantages: torch.Tensor) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """Micro-batches of ``micro_batch_size`` prompts × G completions each, right-padded, with advantages."""
        n = self.cfg.train.micro_batch_size * self.rl.group_size
        return [
            (self.processor.collate(rows[i : i + n], padding_side="right"), advantages[i : i + n])
            for i in range(0, len(rows), n)
        ]

    def _updates(
        self, rows: list[Encoded], advantages: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> tuple[float, float, int]:
        """`updates_per_rollout` forward/backward passes over the rollouts; all but the last applied here."""
        batches = self._batches(rows, advantages)
        local = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in batches)
        (tokens,) = all_reduce([float(local)], self.world)
        with torch.no_grad():  # π_old: the sampling weights (one update: the loss's own log-probs, detached)
            old = [token_logprobs(self.model, b)[0] for b, _ in batches] if self.rl.updates_per_rollout > 1 else None
            ref = [self.reference(b) for b, _ in batches] if self.reference is not None else None
        loss, norm = self._update(batches, old, ref, tokens)
        for _ in range(1, self.rl.updates_per_rollout):
            if math.isfinite(loss) and math.isfinite(norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss, norm = self._update(batches, old, ref, tokens)
        return loss, norm, int(tokens)

    def _update(
        self,
        batches: list[tuple[dict[str, Any], torch.Tensor]],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
        tokens: float,
    ) -> tuple[float, float]:
        """One forward/backward over the micro-batches → the global (loss, grad norm); the KL and the clip
        fraction per completion token go to ``self.stats``."""
        model, w, rl = self.model, self.world, self.rl
        model.train()
        loss_sum, clipped, kl = 0.0, 0.0, 0.0
        for i, (b, adv) in enumerate(batches):
            logp, mask = token_logprobs(model, b)
            parts = grpo_loss(logp, old[i] if old is not None else logp.detach(), adv.to(logp.device), mask,
                              rl.clip_eps, ref[i] if ref is not None else None, rl.kl_coef)  # fmt: skip
            (parts.loss_sum * w.dp_size / max(tokens, 1)).backward()  # FSDP averages over ranks: undo it
            loss_sum += float(parts.loss_sum.detach())
            clipped, kl = clipped + parts.clipped, kl + parts.kl_sum
        images = any(b.get("pixel_values") is not None for b, _ in batches)
        memory = any(b["memory_index"].numel() > 0 for b, _ in batches)
        used = {"llm": True, "projector": images, "resampler": images, "vision": images,
                "xattn": memory and not model.gate_off}  # fmt: skip
        params = fill_unused_grads(model, used)
        norm = grad_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
        loss_sum, clipped, kl = all_reduce([loss_sum, clipped, kl], w)
        n = max(tokens, 1)
        self.stats.update(kl=kl / n, clip_fraction=clipped / n)
        return loss_sum / n, norm

    def _stats(
        self, rewards: dict[str, list[float]], completions: list[list[int]], rollout_s: float, train_s: float
    ) -> dict[str, float]:
        """Rewards (each and their sum: mean and std over every process's completions), the share of groups
        whose rewards differ, completion length and this process's rollout and training seconds."""
        named = {**rewards, "": [sum(v) for v in zip(*rewards.values(), strict=True)]}
        sums = [f(v) for v in named.values() for f in (sum, lambda v: sum(x * x for x in v))]
        g = self.rl.group_size
        groups = [named[""][i : i + g] for i in range(0, len(completions), g)]
        mixed = float(sum(max(r) != min(r) for r in groups))  # groups that teach: not every reward equal
        n, length, mixed, *sums = all_reduce(
            [float(len(completions)), float(sum(map(len, completions))), mixed, *sums], self.world
        )
        out: dict[str, float] = {}
        for k, name in enumerate(named):
            mean, square = sums[2 * k] / n, sums[2 * k + 1] / n
            key = f"reward/{name}/" if name else "reward/"
            out[key + "mean"], out[key + "std"] = mean, math.sqrt(max(square - mean * mean, 0.0))
        out.update(kl=self.stats["kl"], clip_fraction=self.stats["clip_fraction"], completion_len=length / n)
        out["mixed_groups"] = mixed * g / n  # the share of groups with a non-zero advantage
        out["rollout_s"], out["train_s"] = rollout_s, train_s
        return out


def fit_completions(
    prompt_lens: list[int], completions: list[list[int]], finished: list[bool], max_seq_len: int
) -> tuple[list[list[int]], list[bool]]:
    """Each completion cut so that its prompt and it fit ``data.max_seq_len`` (what SFT's samples must fit); a
    cut completion did not end by itself. The rollout still decodes ``max_new_tokens`` for every row: under
    torchrun all processes decode the same number of steps, whatever their prompts' lengths."""
    cut = [c[: max(max_seq_len - n, 0)] for n, c in zip(prompt_lens, completions, strict=True)]
    return cut, [f and len(k) == len(c) for f, k, c in zip(finished, cut, completions, strict=True)]


def make_reference(frozen: Any) -> Reference:
    """The reference policy of GRPO's KL: `frozen`, a separate copy of the starting weights. With LoRA too: the
    LLM with its adapters off is not the starting model once the projector (and x-attn) has trained."""

    def logprobs(batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return token_logprobs(frozen, batch)[0]

    return logprobs
