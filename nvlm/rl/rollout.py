"""GRPO rollouts on nvlm's own runner: G completions per prompt, sampled from the training model's weights.

A prompt is the training sample itself cut before its last answer (``split_answer``): the processor encoded it
once, and the completion is appended to those very ids (``with_completion``), so the ids, tiles and x-attn ranges
the rollout was sampled from are those the loss sees; no text is re-tokenized and no image re-encoded.

Each group is prefilled once: the B distinct prompts go through one left-padded prefill (vision tower, projector,
the LLM's KV and, for NVLM-X/-H, every x-attn block's memory K/V), and each prompt's row is then copied G times
into the decoding runner (``ModelRunner.adopt``). Decoding samples every row on the device; under torchrun every
process decodes ``max_new_tokens`` steps (``fixed_steps``), so ranks whose completions end early still take part
in the sharded forwards of the others.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from nvlm.data.processor import Encoded
from nvlm.inference.runner import ModelRunner
from nvlm.inference.sampler import RowSettings, sample


def split_answer(sample: Encoded) -> tuple[Encoded, list[int]]:
    """A training sample → (its prompt: everything before its last labelled run, no labels; that run's ids, the
    reference answer). ValueError for a sample with no answer."""
    last = max((i for i, y in enumerate(sample.labels) if y != -100), default=-1)
    if last < 0:
        raise ValueError("a GRPO prompt needs a reference answer: the sample has no assistant turn")
    start = last
    while start > 0 and sample.labels[start - 1] != -100:
        start -= 1
    prompt = dataclasses.replace(
        sample,
        input_ids=sample.input_ids[:start],
        xattn_lo=sample.xattn_lo[:start],
        xattn_hi=sample.xattn_hi[:start],
        labels=[-100] * start,
    )
    return prompt, sample.input_ids[start : last + 1]


def with_completion(prompt: Encoded, completion: list[int]) -> Encoded:
    """`prompt` followed by `completion`, which is labelled (the loss's tokens) and sees the whole memory, as a
    decoded token does."""
    n = len(completion)
    return dataclasses.replace(
        prompt,
        input_ids=prompt.input_ids + completion,
        xattn_lo=prompt.xattn_lo + [0] * n,
        xattn_hi=prompt.xattn_hi + [prompt.memory_len] * n,
        labels=[-100] * len(prompt.input_ids) + completion,
    )


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # each prompt's ids as the runner was prefilled with them
    completions: list[list[int]]  # B·G, prompt-major; each up to and with its first end token
    finished: list[bool]  # the completion ended with an end token (not cut at max_new_tokens)
    logprobs: list[list[float]]  # the runner's log-probability of each completion token (temperature 1)
    seconds: float


def rollout(
    model: Any,
    processor: Any,
    prompts: list[Encoded],
    group_size: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    fixed_steps: bool = False,
) -> Rollout:
    """Sample `group_size` completions of each prompt with `model` as it is now (in eval mode meanwhile)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        tokens, logprobs = _sample(model, processor, prompts, group_size, max_new_tokens, temperature, top_p,
                                   eos_ids, generator, fixed_steps)  # fmt: skip
    finally:
        model.train(was_training)
    completions, finished, lps = [], [], []
    for row, lp in zip(tokens, logprobs, strict=True):
        end = next((i for i, t in enumerate(row) if t in eos_ids), None)
        completions.append(row if end is None else row[: end + 1])
        lps.append(lp[: len(completions[-1])])
        finished.append(end is not None)
    ids = [list(p.input_ids) for p in prompts]
    return Rollout(ids, completions, finished, lps, time.perf_counter() - t0)


def _sample(
    model: Any,
    processor: Any,
    prompts: list[Encoded],
    g: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    generator: torch.Generator | None,
    fixed_steps: bool,
) -> tuple[list[list[int]], list[list[float]]]:
    """The decoding loop → per row (B·G) its `max_new_tokens` (or fewer) tokens and their log-probabilities.

    One process: in inference mode. Under FSDP2 (`fixed_steps`) only without gradients: the weights it gathers
    for a forward in inference mode would be inference tensors that the next training forward cannot write into."""
    with torch.no_grad() if fixed_steps else torch.inference_mode():
        batch = processor.collate(prompts, padding_side="left")
        once = ModelRunner(model)
        first = once.prefill(batch, list(range(len(prompts))))[:, -1]  # [B, vocab]: one prefill per group
        runner = ModelRunner(model)
        for i in range(len(prompts)):
            for _ in range(g):
                runner.adopt(once, i)  # the prompt's KV and memory K/V, copied, not recomputed
        del once
        logits = first.repeat_interleave(g, 0)  # [B·G, vocab]
        n, device = logits.shape[0], logits.device
        settings = RowSettings.of([temperature] * n, [top_p] * n, [0] * n, [generator] * n, device)
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        pad_id = model.config.image_token_id  # never sampled: the image-pad token stands for no features
        steps, lps = [], []
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), -1)
            logits[:, pad_id] = float("-inf")
            nxt = torch.where(done, eos[0], sample(logits, settings))
            steps.append(nxt)
            lps.append(logp.gather(1, nxt[:, None])[:, 0])
            done |= torch.isin(nxt, eos)
            if step == max_new_tokens - 1 or (not fixed_steps and bool(done.all())):
                break
            runner.feed(0, nxt)
            logits = runner.decode()
        return torch.stack(steps, 1).tolist(), torch.stack(lps, 1).tolist()  # [B·G, steps] each
