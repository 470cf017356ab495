"""Generation for NVLM-D/X/H: a one-shot client of the model runner that the serving engine also drives.

The prompts are prefilled together (left padded, as the processor collates them), then each step samples
every row on the device (``nvlm.inference.sampler``) and feeds the tokens back to ``ModelRunner.decode``: the
LLM's KV and the cross-attention memory K/V are written once into the runner's buffers and reused. Greedy or
sampled (temperature, top-p, a seed); stops on end-of-sequence tokens or stop strings; ``stream=True`` yields
text pieces as they become final (``nvlm.inference.detok``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nvlm.data.chat import chat_prompt
from nvlm.inference.detok import Detokenizer, stop_ids
from nvlm.inference.runner import ModelRunner, sliding_window
from nvlm.inference.sampler import RowSettings, sample, sample_next

__all__ = ["chat", "generate", "generate_ids", "sample_next"]


def generate_ids(
    model: Any,
    batch: dict[str, Any],
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: list[int] | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, step by step ([B] tensors). Finished samples get eos.

    The steps run in ``torch.inference_mode`` (no autograd bookkeeping on any op: ~10 % of a small model's
    decoding step on CPU); each token is handed out as an ordinary tensor, usable anywhere afterwards.
    ``use_cache=False`` recomputes the whole sequence at every step: the reference the runner must equal."""
    settings = (do_sample, temperature, top_p, eos_token_ids, seed)
    steps = (
        _decode(model, batch, max_new_tokens, *settings)
        if use_cache
        else _recompute(model, batch, max_new_tokens, *settings)
    )
    for nxt in steps:
        yield nxt.clone()  # runs outside inference mode: an ordinary tensor, not an inference tensor


class _Rows:
    """What both generation paths share per call: the sampling settings, the eos rule and the image-pad ban."""

    def __init__(self, model: Any, b: int, do_sample: bool, temperature: float, top_p: float, eos: Any, seed: Any):
        device = model.device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None  # on the logits' device
        t = temperature if do_sample else 0.0
        self.settings = RowSettings.of([t] * b, [top_p] * b, [0] * b, [gen] * b, device)
        self.eos = torch.tensor(eos or [], dtype=torch.long, device=device)  # there once, not copied per step
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.pad_id = model.config.image_token_id  # never sampled: the image-pad token has no features to stand for

    def next(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, vocab] (this forward's own output, edited in place) → [B] tokens; finished rows get eos."""
        logits[:, self.pad_id] = float("-inf")
        nxt = sample(logits, self.settings)
        if self.eos.numel():
            nxt = torch.where(self.done, self.eos[0], nxt)
            self.done |= torch.isin(nxt, self.eos)
        return nxt

    def over(self) -> bool:
        return bool(self.eos.numel()) and bool(self.done.all())  # a device read only when eos ids are given


@torch.inference_mode()
def _decode(
    model: Any,
    batch: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    eos_token_ids: list[int] | None,
    seed: int | None,
) -> Iterator[torch.Tensor]:
    """``generate_ids``' loop through the runner; no forward for a token nobody asks for."""
    b, t = batch["input_ids"].shape
    window = sliding_window(model.llm.config)
    if window and t + max_new_tokens > window and not bool(batch["attention_mask"].all()):
        raise ValueError(
            f"prompts of different lengths + max_new_tokens ({t} + {max_new_tokens}) exceed the LLM's sliding "
            f"window of {window} tokens: generate them one at a time, or with fewer new tokens"
        )
    rows = _Rows(model, b, do_sample, temperature, top_p, eos_token_ids, seed)
    runner = ModelRunner(model)
    logits = runner.prefill(batch, list(range(b)))[:, -1]
    for step in range(max_new_tokens):
        nxt = rows.next(logits)
        yield nxt
        if step == max_new_tokens - 1 or rows.over():
            return
        runner.feed(0, nxt)
        logits = runner.decode()


@torch.inference_mode()
def _recompute(
    model: Any,
    batch: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    eos_token_ids: list[int] | None,
    seed: int | None,
) -> Iterator[torch.Tensor]:
    """The whole sequence through the model at every step, no cache: the reference for the runner's steps."""
    full = {k: v for k, v in batch.items() if k != "labels"}
    rows = _Rows(model, full["input_ids"].shape[0], do_sample, temperature, top_p, eos_token_ids, seed)
    out = model(**full, logits_to_keep=1)
    memory_len = out.xattn_state.memory_len if out.xattn_state is not None else None
    for step in range(max_new_tokens):
        nxt = rows.next(out.logits[:, -1])
        yield nxt
        if step == max_new_tokens - 1 or rows.over():
            return
        full = _append(full, nxt, memory_len)
        out = model(**full, logits_to_keep=1)


def _append(batch: dict[str, Any], nxt: torch.Tensor, memory_len: torch.Tensor | None) -> dict[str, Any]:
    """`batch` with one more token per row; the new token sees its row's whole memory."""
    new = dict(batch)
    new["input_ids"] = torch.cat([batch["input_ids"].to(nxt.device), nxt[:, None]], dim=1)
    new["attention_mask"] = torch.cat([batch["attention_mask"].to(nxt.device), torch.ones_like(nxt)[:, None]], 1)
    if batch.get("xattn_lo") is not None:
        hi = memory_len[:, None] if memory_len is not None else torch.zeros_like(nxt)[:, None]
        new["xattn_lo"] = torch.cat([batch["xattn_lo"].to(nxt.device), torch.zeros_like(nxt)[:, None]], dim=1)
        new["xattn_hi"] = torch.cat([batch["xattn_hi"].to(nxt.device), hi.to(nxt.device)], dim=1)
    return new


def generate(
    model: Any,
    processor: Any,
    prompts: str | list[str],
    images: list | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    stream: bool = False,
) -> Any:
    """Complete prompt string(s) with ``<image>`` placeholders, encoded by `processor` (``nvlm.load`` returns it
    beside the model). Returns str (one prompt), list[str], or with ``stream=True`` (one prompt) an iterator of
    text pieces."""
    single = isinstance(prompts, str)
    if stream and not single:
        raise ValueError("stream=True takes one prompt")
    texts = [prompts] if single else list(prompts)
    image_lists = [images or []] if single else (images or [[] for _ in texts])
    batch = processor(texts, image_lists, padding_side="left")
    ends = stop_ids(processor.tokenizer)
    steps = generate_ids(
        model,
        batch,
        max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=ends,
        use_cache=use_cache,
        seed=seed,
    )
    rows = [Detokenizer(processor.tokenizer, stop or [], ends) for _ in texts]
    if stream:
        return _stream(rows[0], steps)
    for nxt in steps:
        for row, token in zip(rows, nxt.tolist(), strict=True):
            row.add(token)
        if all(row.finished for row in rows):
            break
    for row in rows:
        row.flush()
    return rows[0].text if single else [row.text for row in rows]


def _stream(row: Detokenizer, steps: Iterator[torch.Tensor]) -> Iterator[str]:
    sent = 0
    for nxt in steps:
        row.add(int(nxt[0]))
        safe = row.safe_len()
        if safe > sent:
            yield row.text[sent:safe]
            sent = safe
        if row.finished:
            return
    row.flush()
    if len(row.text) > sent:
        yield row.text[sent:]


def chat(
    model: Any,
    processor: Any,
    question: str,
    image: Any = None,
    images: list | None = None,
    system: str | None = None,
    **kwargs: Any,
) -> Any:
    """Ask one question about zero or more images; returns the answer (or a stream with ``stream=True``)."""
    pics = list(images or []) + ([image] if image is not None else [])
    prompt = chat_prompt(question, len(pics), system, model.config.template)
    return generate(model, processor, prompt, pics, **kwargs)
