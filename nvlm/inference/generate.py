"""Generation for NVLM-D/X/H: prefill, then decode with the LLM's KV cache and the cross-attention K/V.

The image memory's K/V is computed once per image in the prefill (``XAttnState``) and reused at every step.
Greedy or sampled (temperature, top-p); stops on end-of-sequence tokens or stop strings; batches are left
padded; ``stream=True`` yields text pieces as they become final.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nvlm.data.chat import chat_prompt
from nvlm.inference.kv_cache import preallocated_cache


def sample_next(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """[B, vocab] → [B] next token ids."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    decoding step on CPU); each token is handed out as an ordinary tensor, usable anywhere afterwards."""
    for nxt in _decode(model, batch, max_new_tokens, do_sample, temperature, top_p, eos_token_ids, use_cache, seed):
        yield nxt.clone()  # runs outside inference mode: an ordinary tensor, not an inference tensor


@torch.inference_mode()
def _decode(
    model: Any,
    batch: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    eos_token_ids: list[int] | None,
    use_cache: bool,
    seed: int | None,
) -> Iterator[torch.Tensor]:
    """``generate_ids``' loop. A decoding step is one token per sample through the LLM with its KV cache (written
    in place into buffers sized for the whole call: ``nvlm.inference.kv_cache``); what the step needs besides
    is made once per call, not per step: the attention mask (a view of one buffer for
    prompt + new tokens, or none at all when no sample is padded), the next positions (counted up, not
    re-derived from the mask) and, while no eos is given, no device→host synchronisation at all."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    batch = {k: v for k, v in batch.items() if k != "labels"}
    device = model.device
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    eos = torch.tensor(eos_token_ids or [], dtype=torch.long, device=device)  # there once, not copied per step
    pad_id = model.config.image_token_id  # never sampled: the image-pad token has no features to stand for
    # room for the prompt and every new token, written in place (no torch.cat of the whole cache per step)
    cache = preallocated_cache(model.llm.config, t + max_new_tokens) if use_cache else None
    out = model(**batch, use_cache=use_cache, logits_to_keep=1, past_key_values=cache)
    cache, state = out.past_key_values, out.xattn_state
    # Left padding only ever sits in the prompt: with none (read on the host mask from the processor, free),
    # decoding steps need no mask at all; otherwise each step passes the prefix of one buffer.
    padded = not bool(mask.all())
    full_mask = torch.ones(b, t + max_new_tokens, dtype=mask.dtype, device=device)
    full_mask[:, :t] = mask.to(device)
    position = mask.to(device).sum(-1, keepdim=True)  # [B, 1]: the first new token's position (real tokens only)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    full = dict(batch)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]  # [B, vocab]: this forward's own output, safe to edit in place
        logits[:, pad_id] = float("-inf")  # the image-pad token is never generated: it has no features
        nxt = sample_next(logits, do_sample, temperature, top_p, gen).to(device)
        if eos.numel():
            nxt = torch.where(done, eos[0], nxt)
            done |= torch.isin(nxt, eos)
        yield nxt
        if step == max_new_tokens - 1 or (eos.numel() and bool(done.all())):
            return  # no forward for a token nobody asks for
        mask_now = full_mask[:, : t + step + 1]
        if use_cache:
            out = model(
                nxt[:, None],
                mask_now if padded else None,
                past_key_values=cache,
                xattn_state=state,
                use_cache=True,
                position_ids=position,
            )
            cache = out.past_key_values
            position = position + 1
        else:  # recompute the whole sequence: the reference the cached path must equal
            full = _append(full, nxt, mask_now, state)
            out = model(**full, logits_to_keep=1)


def _append(batch: dict[str, Any], nxt: torch.Tensor, mask: torch.Tensor, state: Any) -> dict[str, Any]:
    new = dict(batch)
    new["input_ids"] = torch.cat([batch["input_ids"].to(nxt.device), nxt[:, None]], dim=1)
    new["attention_mask"] = mask
    if batch.get("xattn_lo") is not None:
        hi = state.memory_len[:, None] if state is not None else torch.zeros_like(nxt)[:, None]
        new["xattn_lo"] = torch.cat([batch["xattn_lo"].to(nxt.device), torch.zeros_like(nxt)[:, None]], dim=1)
        new["xattn_hi"] = torch.cat([batch["xattn_hi"].to(nxt.device), hi.to(nxt.device)], dim=1)
    return new


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


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
    stop_ids = _stop_ids(processor.tokenizer)
    steps = generate_ids(
        model,
        batch,
        max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=stop_ids,
        use_cache=use_cache,
        seed=seed,
    )
    decoder = _Detok(processor.tokenizer, len(texts), stop or [], stop_ids)
    if stream:
        return decoder.stream(steps)
    decoder.run(steps)
    return decoder.texts[0] if single else decoder.texts


class _Detok:
    """Incremental detokenisation with stop strings; holds back text that may still become a stop string."""

    def __init__(self, tokenizer: Any, n: int, stop: list[str], stop_ids: list[int]) -> None:
        self.tok, self.stop, self.stop_ids = tokenizer, stop, set(stop_ids)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n
        self.finished = [False] * n

    def _update(self, nxt: torch.Tensor) -> None:
        for i, t in enumerate(nxt.tolist()):
            if self.finished[i]:
                continue
            if t in self.stop_ids:
                self.finished[i] = True
                continue
            self.ids[i].append(t)
            text = self.tok.decode(self.ids[i], skip_special_tokens=True)
            cut = min((text.find(s) for s in self.stop if s in text), default=-1)
            if cut >= 0:
                text, self.finished[i] = text[:cut], True
            self.texts[i] = text

    def run(self, steps: Iterator[torch.Tensor]) -> None:
        for nxt in steps:
            self._update(nxt)
            if all(self.finished):
                break

    def stream(self, steps: Iterator[torch.Tensor]) -> Iterator[str]:
        sent = 0
        for nxt in steps:
            self._update(nxt)
            text = self.texts[0]
            safe = len(text) if self.finished[0] else self._safe_len(text)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if self.finished[0]:
                return
        if len(self.texts[0]) > sent:
            yield self.texts[0][sent:]

    def _safe_len(self, text: str) -> int:
        n = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest
        for s in self.stop:  # a suffix that starts a stop string may still turn into it
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[:n].endswith(s[:k]):
                    n -= k
                    break
        return n


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
