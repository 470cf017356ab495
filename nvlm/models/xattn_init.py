"""How a new model's gated cross-attention blocks start (paper §4.2, NVLM-X): drawn a few rows at a time.

The blocks are NVLM-X's and -H's largest own modules: at 72B, one block per four LLM layers is ≈ 8.6 B
parameters, ≈ 35 GB in fp32. Drawn whole on every process, stage 1 would hold all of them on the host of every
rank before sharding. Here a block's weights stay on the meta device in the skeleton (``nvlm.models.build``) and
every tensor is drawn in chunks of ``CHUNK_ROWS`` rows, each chunk from its own generator seeded by (the model's
seed, the tensor's name, the chunk's index). A process then draws only the chunks that overlap its block of the
tensor (``nvlm.models.fill``), and one process and N processes hold the same values.

What each tensor starts as is what torch's modules draw: a Linear's weight U(−1/√fan_in, 1/√fan_in) (Kaiming
uniform with a = √5), a norm's weight 1, the tanh gates 0 (so an untrained block is an identity, §4.2).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CHUNK_ROWS = 8  # rows drawn from one generator: small, so a process's block rounds to few extra rows


@dataclass(frozen=True)
class Drawn:
    """A tensor drawn from `seed`: `kind` "uniform" (U(−scale, scale)) or "constant" (every value = scale)."""

    seed: int
    key: str  # the tensor's name in the model's x-attn blocks: which generators draw it
    kind: str
    scale: float
    shape: tuple[int, ...]

    def block(self, shape: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
        """The box [offset, offset + shape) of the tensor, drawing only the row chunks that overlap it."""
        if self.kind == "constant" or not shape:
            return torch.full(shape, self.scale)
        first, stop = offset[0], offset[0] + shape[0]
        parts = []
        for chunk in range(first // CHUNK_ROWS, math.ceil(stop / CHUNK_ROWS)):
            lo = chunk * CHUNK_ROWS
            rows = draw_rows(self, chunk, min(CHUNK_ROWS, self.shape[0] - lo))  # [rows, *shape[1:]]
            parts.append(rows[max(first - lo, 0) : stop - lo])
        cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
        return torch.cat(parts)[(slice(None), *cols)]


def draw_rows(t: Drawn, chunk: int, rows: int) -> torch.Tensor:
    """Rows [chunk·CHUNK_ROWS, … + rows) of `t`, from the chunk's own generator."""
    name = f"{t.seed}/{t.key}/{chunk}".encode()
    seed = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 1  # < 2**63
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(rows, *t.shape[1:]).uniform_(-t.scale, t.scale, generator=gen)


def plan(model: Any, seed: int) -> dict[str, Drawn]:
    """{name in `model`: how it is drawn} for every tensor of `model`'s x-attn blocks."""
    names: dict[int, list[str]] = {}  # a block is reachable twice: model.xattn.i and inside its decoder layer
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    out: dict[str, Drawn] = {}
    for module_name, module in model.xattn.named_modules(prefix="xattn"):
        for local, p in module.named_parameters(recurse=False):
            key = f"{module_name}.{local}"  # the same generators whichever name a loader asks by
            kind, scale = _rule(module, local, key)
            out.update(dict.fromkeys(names[id(p)], Drawn(seed, key, kind, scale, tuple(p.shape))))
    return out


def _rule(module: nn.Module, local: str, key: str) -> tuple[str, float]:
    """(kind, scale) of a tensor as torch's own init draws it; an unknown tensor is a bug to fix here."""
    if isinstance(module, nn.Linear) and local in ("weight", "bias"):
        return "uniform", 1.0 / math.sqrt(module.in_features)
    if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
        return "constant", 1.0 if local == "weight" else 0.0
    if local.startswith("gate_"):  # tanh(0) = 0: the block adds nothing until it has learnt to
        return "constant", 0.0
    raise TypeError(f"no starting values for the x-attn tensor {key} ({type(module).__name__}): give it a rule here")
