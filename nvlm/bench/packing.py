"""``nvlm bench packing``: SFT training steps on long-tailed sample lengths, padded to the longest vs packed
(``nvlm.data.packing``), in real (non-padding) tokens per second.

One NVLM-D (cpu preset shapes), one micro-batch of `samples` text conversations whose lengths follow a
log-normal law clipped to [32, max_len] tokens (most short, a few long: what SFT mixtures look like), timed
in one process: warm-up, then padded/packed/packed/padded rounds and medians. The padded micro-batch is what
``data.pack=false`` trains on; the packed one what the default does. Their losses are compared (the same
token-level mean; packed rows attend within each sample: per-sample SDPA, ``nvlm.models.packed_attention``).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import numpy as np
import torch

from nvlm.bench.train import Shape
from nvlm.bench.vs_hf import _interleaved
from nvlm.data.packing import collate_packed, pack_greedy
from nvlm.models.packed_attention import use_packed_attention
from nvlm.training.optim import make_optimizer


def long_tailed_samples(processor: Any, n: int, max_len: int, seed: int = 0) -> list[Any]:
    """`n` encoded conversations, lengths ~ lognormal(mean log 96 tokens, sigma 0.8) clipped to [32, max_len]."""
    from nvlm.data.chat import chat_prompt

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(96), 0.8, n), 32, max_len).astype(int)
    samples = []
    for length in lengths:
        words = max(4, int(length) - 14)  # one token per " yes"/" no", minus the chat template's ~14
        segments = [
            (chat_prompt(" yes" * (words // 2), 0), False),
            (" no" * (words - words // 2) + "<|im_end|>\n", True),
        ]
        enc = processor.encode_segments(segments, [])
        samples.append(enc)
    return [s for s in samples if len(s.input_ids) <= max_len]


def _step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Any], packed: bool = False) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(**batch, return_logits=False, packed=packed)
    (out.loss_sum / max(out.num_tokens, 1)).backward()
    opt.step()


def bench_packing(shape: Shape, samples: int, max_len: int, seed: int = 0) -> dict[str, Any]:
    from nvlm.bench.train import build_models

    models, processors = build_models(["D"], shape, "sft", seed)
    model, proc = models["D"], processors["D"]
    use_packed_attention(model.llm)  # as the trainer does on CPU: packed rows attend per sample; padded: SDPA
    encoded = long_tailed_samples(proc, samples, max_len, seed)
    padded = proc.collate(encoded, padding_side="right")
    rows = pack_greedy([len(s.input_ids) for s in encoded], max_len)
    packed = collate_packed(
        [[encoded[i] for i in r] for r in rows], proc.tokenizer.pad_token_id or 0, proc.tokens_per_tile
    )
    with torch.no_grad():
        a, b = model(**padded, return_logits=False), model(**packed, return_logits=False, packed=True)
    rel_diff = abs(float(a.loss) - float(b.loss)) / abs(float(a.loss))
    opt = make_optimizer(model, 1e-5, 0.0, (0.9, 0.95))
    real = sum(len(s.input_ids) for s in encoded)
    race = _interleaved(  # "ours" = packed, "theirs" = padded
        partial(_step, model, opt, packed, True), partial(_step, model, opt, padded), shape.steps, shape.warmup
    )
    return {
        "samples": len(encoded),
        "real_tokens": real,
        "padded_shape": list(padded["input_ids"].shape),
        "packed_shape": list(packed["input_ids"].shape),
        "padded_tokens_per_s": real / race.theirs,
        "packed_tokens_per_s": real / race.ours,
        "ratio": race.ratio,
        "ratio_quartiles": list(race.spread),
        "loss_rel_diff": rel_diff,
        "threads": torch.get_num_threads(),
        "rounds": shape.steps,
        "warmup": shape.warmup,
        "load_avg_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"nvlm bench packing — NVLM-D cpu preset, one SFT micro-batch of {r['samples']} text samples "
            f"({r['real_tokens']} real tokens, long-tailed lengths), {r['threads']} thread(s), median of "
            f"{r['rounds']} interleaved rounds after {r['warmup']} warm-up; load average {r['load_avg_1m']:.1f} "
            f"on {r['cpu_count']} cores at the start",
            "",
            f"{'':<8}{'batch shape':>14}{'real tokens/s':>15}",
            f"{'padded':<8}{'×'.join(map(str, r['padded_shape'])):>14}{r['padded_tokens_per_s']:>15.1f}",
            f"{'packed':<8}{'×'.join(map(str, r['packed_shape'])):>14}{r['packed_tokens_per_s']:>15.1f}",
            f"packed/padded {r['ratio']:.2f} (median of the rounds' ratios; quartiles "
            f"{r['ratio_quartiles'][0]:.2f}–{r['ratio_quartiles'][1]:.2f}); loss relative difference "
            f"{r['loss_rel_diff']:.1e}",
        ]
    )
