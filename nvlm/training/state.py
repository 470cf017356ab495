"""Atomic training checkpoints and exact resume.

A checkpoint is written into ``checkpoints/step_XXXXXXX.tmp/`` and renamed to ``step_XXXXXXX/`` only after
every file, and last a ``COMPLETE`` marker, is on disk; a run killed half-way through a save leaves a ``.tmp``
folder that is never loaded. It holds the trainable weights (safetensors; frozen weights are the
backbones' and are rebuilt from them), the optimizer state, the RNG states, the data position and step,
and the resolved run config. Loading uses ``torch.load(weights_only=True)``: no arbitrary pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MARKER = "COMPLETE"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], run_config: dict[str, Any], keep_last: int = 2) -> Path:
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one file system: a reader sees all of it or none
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
            and (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `path`; returns the trainer state (step, data position, …)."""
    state = load_file(str(path / "trainable.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(f"checkpoint {path} holds {len(state)} trainable tensors but this run trains "
                         f"{len(trainable)}: was it written by a different stage or model? Use a new --out folder.")
    model.load_state_dict(state, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
