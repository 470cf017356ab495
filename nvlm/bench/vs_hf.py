"""``nvlm bench train --vs hf`` and ``nvlm bench generate --vs hf``: our NVLM-D / NVLM-X against transformers'
InternVL / Mllama (``nvlm.bench.hf_refs``), timed in one process.

Each comparison is warm-up calls, then rounds ours, theirs, theirs, ours (so drift in the machine's load hits
both alike) and medians. Training: one full step each (forward with the loss, backward, the same fused AdamW
from ``nvlm.training.optim``); ours computes the LM head only at labelled positions, as our trainer does,
transformers over every position, as its models do. Generation: greedy decoding of a fixed number of new
tokens (no early stop), ours through ``generate_ids`` and theirs through ``.generate``; for D the two token
streams are compared. ``--compile ours|both`` (training): torch.compile per layer, as ``train.compile``.
Ratios are ours/theirs in samples/s or tokens/s: > 1 means ours is faster.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from nvlm.bench.hf_refs import Pair, build_pair, generate_inputs, reference_compile_targets
from nvlm.bench.train import Shape
from nvlm.training.optim import make_optimizer


@dataclass(frozen=True)
class Race:
    """Seconds per call of `ours` and `theirs` (medians over rounds) and the ratio theirs/ours (> 1: ours faster),
    taken as the median of each round's own ratio: the two calls of a round run back to back, so a slow spell of
    the machine (seen here: ±20 % on the same matmul from one second to the next) slows both; `spread` is the
    lower and upper quartile of the rounds' ratios."""

    ours: float
    theirs: float
    ratio: float
    spread: tuple[float, float]


def _interleaved(ours: Callable[[], Any], theirs: Callable[[], Any], rounds: int, warmup: int) -> Race:
    """`ours` and `theirs` over `rounds` rounds, alternately ours-theirs and theirs-ours, after `warmup` calls
    of each."""
    for _ in range(warmup):
        ours()
        theirs()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(rounds):
        order = (("ours", ours), ("theirs", theirs)) if r % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [t / o for o, t in zip(times["ours"], times["theirs"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return Race(
        statistics.median(times["ours"]),
        statistics.median(times["theirs"]),
        statistics.median(ratios),
        (quartiles[0], quartiles[2]),
    )


def _train_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Any], ours: bool) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(**batch, return_logits=False) if ours else model(**batch)
    out.loss.backward()
    opt.step()


def bench_train(archs: list[str], shape: Shape, seed: int = 0, compile: str = "none") -> dict[str, Any]:
    """Training step, ours vs the reference, for each arch. `compile`: "ours" compiles our model as
    ``train.compile`` does (``compile_blocks``: each decoder layer whole, each x-attn block, each vision layer, the
    projector), "both" also the reference's counterparts (``reference_compile_targets``), so that like meets like."""
    rows = []
    for arch in archs:
        pair = build_pair(arch, shape, seed)
        (ours_batch, hf_batch), b = pair.train, shape.batch_size
        opt_ours = make_optimizer(pair.ours, 1e-5, 0.1, (0.9, 0.95))
        opt_hf = make_optimizer(pair.hf, 1e-5, 0.1, (0.9, 0.95))
        ours = partial(_train_step, pair.ours, opt_ours, ours_batch, True)
        theirs = partial(_train_step, pair.hf, opt_hf, hf_batch, False)
        first = {}
        if compile != "none":
            from nvlm.distributed.parallel import compile_blocks, compile_forwards

            compile_blocks(pair.ours)
            if compile == "both":
                compile_forwards(reference_compile_targets(pair.hf))
            first = {"ours_first_step_s": _seconds(ours), "hf_first_step_s": _seconds(theirs)}  # compiles
        race = _interleaved(ours, theirs, shape.steps, shape.warmup)
        rows.append(
            {
                **_describe(pair),
                "ours_samples_per_s": b / race.ours,
                "hf_samples_per_s": b / race.theirs,
                "ratio": race.ratio,
                "ratio_quartiles": list(race.spread),
                **first,
            }
        )
    return {"command": "train", "settings": {**_settings(shape, seed), "compile": compile}, "rows": rows}


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_generate(
    archs: list[str], shape: Shape, batch_sizes: list[int], new_tokens: int, seed: int = 0
) -> dict[str, Any]:
    """Greedy decoding of `new_tokens` tokens, ours vs the reference, for each arch and batch size."""
    rows = []
    for arch in archs:
        pair = build_pair(arch, shape, seed)
        pair.ours.eval()
        pair.hf.eval()
        pad = pair.ours.config.image_token_id
        for b in batch_sizes:
            ours_in, hf_in = generate_inputs(pair, b, seed)
            prompt = ours_in["input_ids"].shape[1]

            ours = partial(_ours_generate, pair.ours, ours_in, new_tokens)
            theirs = partial(_hf_generate, pair.hf, hf_in, new_tokens, pad)
            same = bool(torch.equal(ours(), theirs())) if arch == "D" else None
            if same is False:  # same weights and inputs: a speed figure for different tokens would mean nothing
                raise RuntimeError(f"NVLM-D and InternVL generated different tokens at batch {b}: not timed")
            race = _interleaved(ours, theirs, shape.steps, shape.warmup)
            rows.append(
                {
                    **_describe(pair),
                    "batch_size": b,
                    "prompt_tokens": prompt,
                    "new_tokens": new_tokens,
                    "same_tokens": same,
                    "ours_tokens_per_s": b * new_tokens / race.ours,
                    "hf_tokens_per_s": b * new_tokens / race.theirs,
                    "ratio": race.ratio,
                    "ratio_quartiles": list(race.spread),
                }
            )
    settings = {**_settings(shape, seed), "batch_sizes": batch_sizes, "new_tokens": new_tokens}
    return {"command": "generate", "settings": settings, "rows": rows}


def _ours_generate(model: Any, inputs: dict[str, Any], new_tokens: int) -> torch.Tensor:
    from nvlm.inference.generate import generate_ids

    with torch.no_grad():
        return torch.stack(list(generate_ids(model, inputs, new_tokens)), 1)  # no eos: all `new_tokens`


def _hf_generate(model: Any, inputs: dict[str, Any], new_tokens: int, pad: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            suppress_tokens=[pad],  # as ours: the image-pad token is never generated
        )
    return out[:, inputs["input_ids"].shape[1] :]


def _describe(pair: Pair) -> dict[str, Any]:
    return {
        "arch": pair.arch,
        "reference": pair.reference,
        "decoder_tokens": list(pair.decoder_tokens),
        "memory_tokens": list(pair.memory_tokens),
        "max_abs_logit_diff": pair.max_abs_logit_diff,
    }


def _settings(shape: Shape, seed: int) -> dict[str, Any]:
    return {
        "llm": shape.llm,
        "vision": shape.vision,
        "tiles": shape.tiles,
        "text_tokens": shape.text_tokens,
        "batch_size": shape.batch_size,
        "xattn_every": shape.xattn_every,
        "rounds": shape.steps,
        "warmup": shape.warmup,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "load_avg_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


def render(result: dict[str, Any]) -> str:
    """The result as the table the command prints."""
    s, train = result["settings"], result["command"] == "train"
    llm, vit = s["llm"], s["vision"]
    vocab = llm.get("vocab_size", "tokenizer")
    unit = "samples/s" if train else "tokens/s"
    what = f"training step, batch {s['batch_size']}" if train else f"greedy decoding, {s['new_tokens']} new tokens"
    compiled = {"ours": "ours torch.compile'd, reference eager", "both": "both torch.compile'd"}
    if s.get("compile", "none") != "none":
        what += f" ({compiled[s['compile']]})"
    lines = [
        f"nvlm bench {result['command']} --vs hf — {what}; LLM {llm['num_hidden_layers']}L×{llm['hidden_size']} "
        f"(vocab {vocab}), ViT {vit['num_hidden_layers']}L×{vit['hidden_size']}, {s['tiles']}+1 tiles, "
        f"{s['threads']} thread(s), {s['rounds']} interleaved rounds after {s['warmup']} warm-up; "
        f"load average {s['load_avg_1m']:.1f} on {s['cpu_count']} cores at the start",
        "",
        f"{'ours':<8}{'reference':<11}{'batch':>6}{'dec tok':>9}{'mem tok':>10}"
        f"{'ours ' + unit:>17}{'ref ' + unit:>16}{'ours/ref':>10}{'quartiles':>13}  check",
    ]
    for r in result["rows"]:
        if r["max_abs_logit_diff"] is not None:
            check = f"logits max|diff| {r['max_abs_logit_diff']:.1e}"
            if r.get("same_tokens") is not None:
                check += ", same tokens" if r["same_tokens"] else ", tokens DIFFER"
        else:
            check = "random weights (no shared architecture)"
        rate = "samples_per_s" if train else "tokens_per_s"
        mem = "{}/{}".format(*r["memory_tokens"])
        dec = r.get("prompt_tokens", r["decoder_tokens"][0])
        lines.append(
            f"NVLM-{r['arch']:<3}{r['reference']:<11}{r.get('batch_size', s['batch_size']):>6}"
            f"{dec:>9}{mem:>10}{r['ours_' + rate]:>17.2f}{r['hf_' + rate]:>16.2f}"
            f"{r['ratio']:>10.2f}{'{:.2f}–{:.2f}'.format(*r['ratio_quartiles']):>13}  {check}"
        )
    for r in result["rows"]:
        if "ours_first_step_s" in r:
            lines.append(
                f"NVLM-{r['arch']}: first step (compiling) {r['ours_first_step_s']:.1f} s, "
                f"{r['reference']} {r['hf_first_step_s']:.1f} s"
            )
    lines.append("dec tok: decoder tokens per sample (generate: the prompt's); mem tok: image tokens in the")
    lines.append("cross-attention memory per sample, ours/reference. Generation times include the prefill.")
    lines.append("ours/ref: median over rounds of each round's ratio (quartiles beside it); rates: medians.")
    return "\n".join(lines)
