"""One batched sampler for all rows of a step, on the logits' device.

Each row has its own temperature (0: greedy), top-p, top-k and random stream. The filters run once over the
[n, vocab] logits; rows drawn from the same generator are drawn together (one ``torch.multinomial``), so a
seeded request gets the tokens it would get alone, and unseeded rows share the global stream. Nothing here
reads the device: the settings are tensors made when the rows change (``RowSettings.of``), and which filters to
run is known on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSettings:
    """Per-row sampling settings of the rows of a step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [n] float; 1 where the row is greedy (its draw is not used)
    top_p: torch.Tensor  # [n] float
    top_k: torch.Tensor  # [n] long; 0 = off
    sampled: torch.Tensor  # [n] bool: the row samples (temperature > 0)
    greedy: bool  # every row is greedy: argmax only
    nucleus: bool  # some sampled row has top_p < 1
    topk: bool  # some sampled row has top_k > 0
    draws: list[tuple[torch.Generator | None, torch.Tensor]]  # (generator, rows drawn with it)

    @classmethod
    def of(
        cls,
        temperature: list[float],
        top_p: list[float],
        top_k: list[int],
        generators: list[torch.Generator | None],
        device: torch.device,
    ) -> RowSettings:
        """Rows that share a generator object (or none: the global stream) are drawn together, in row order."""
        hot = [t > 0 for t in temperature]
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for i, g in enumerate(generators):
            if hot[i]:
                groups.setdefault(id(g), (g, []))[1].append(i)
        return cls(
            temperature=torch.tensor([t if h else 1.0 for t, h in zip(temperature, hot)], device=device),
            top_p=torch.tensor(top_p, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            sampled=torch.tensor(hot, device=device),
            greedy=not any(hot),
            nucleus=any(h and p < 1.0 for h, p in zip(hot, top_p)),
            topk=any(h and k > 0 for h, k in zip(hot, top_k)),
            draws=[(g, torch.tensor(rows, device=device)) for g, rows in groups.values()],
        )


def sample(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """[n, vocab] logits (disallowed tokens already -inf) → [n] next tokens, on the logits' device."""
    greedy = logits.argmax(-1)
    if rows.greedy:
        return greedy
    logits = logits.float()
    if rows.topk:  # keep each row's k most likely tokens (ties at the k-th kept)
        ranked = logits.sort(-1, descending=True).values
        # a k past the vocabulary keeps every token (the API bounds k, not by the model's vocabulary)
        kth = ranked.gather(1, (rows.top_k - 1).clamp(0, logits.shape[-1] - 1)[:, None])  # [n, 1]
        logits = logits.masked_fill((rows.top_k > 0)[:, None] & (logits < kth), float("-inf"))
    probs = torch.softmax(logits / rows.temperature[:, None], dim=-1)
    if rows.nucleus:  # keep the smallest prefix of sorted tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p >= rows.top_p[:, None]) & (rows.top_p < 1.0)[:, None]
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    out = greedy.clone()
    for generator, idx in rows.draws:
        out[idx] = torch.multinomial(probs[idx], 1, generator=generator).squeeze(-1)
    return out


def sample_next(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """[B, vocab] → [B] next tokens, every row with the same settings and one generator."""
    b = logits.shape[0]
    t = temperature if do_sample else 0.0
    return sample(logits, RowSettings.of([t] * b, [top_p] * b, [0] * b, [generator] * b, logits.device))
