"""Inference split over torchrun's processes (tensor parallelism): the model loaded as blocks, each process
reading only its own (``load_sharded``), and the start of every command under torchrun (``load_tensor_parallel``:
rank 0 returns the model, the other ranks follow its steps). What is split and why: ``nvlm.distributed.inference``;
how rank 0 drives the others: ``nvlm.distributed.follow``.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nvlm.errors import UserError
from nvlm.loading import saved_model
from nvlm.models import fill
from nvlm.models.lora import ADAPTERS

if TYPE_CHECKING:
    from nvlm.data.processor import Processor
    from nvlm.models.nvlm import NVLM


def load_sharded(
    path: str | os.PathLike,
    mesh: Any,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    quantize_keep: tuple[str, ...] | None = None,
) -> tuple[NVLM, Processor]:
    """``load`` for tensor-parallel inference over `mesh` (``nvlm.distributed.inference``): the LLM's and the
    x-attn blocks' projections split as training splits them, each process reading only its block of them from
    the files, one module at a time straight to `device`; with `quantize`, each block is quantized as it is
    read (the keep-list as ``load``'s). nvlm's format only: a release folder is converted first."""
    from nvlm.distributed.inference import localize, split_for_inference
    from nvlm.inference import quantized_io
    from nvlm.inference.quantize import Quantizer, check_scheme
    from nvlm.inference.schemes import DEFAULT_KEEP
    from nvlm.interop.release import is_release

    root = Path(path)
    if not (root / "llm").is_dir() and is_release(root):
        raise UserError(f"{root}: tensor parallelism reads nvlm's format; convert it first: nvlm convert {root} OUT")
    if quantized_io.is_quantized_folder(root):
        raise UserError(f"{root} is quantized as a whole; give the full-precision folder with --quantize instead")
    if any((root / folder / "adapter_config.json").is_file() for folder in ADAPTERS.values()):
        raise UserError(f"{root} holds LoRA adapters; fold them in first (nvlm merge SRC DST), then serve DST")
    unfilled = saved_model(root)
    model, plan = unfilled.model, unfilled.plan()
    if plan is None:
        raise UserError(f"{root}: its weights cannot be read block by block (a layout only transformers reads)")
    keep = DEFAULT_KEEP if quantize_keep is None else tuple(quantize_keep)
    scheme = check_scheme(quantize)
    target = torch.device(device) if device is not None else torch.device("cpu")
    quantizer = Quantizer(model, scheme, keep, dtype, target) if scheme is not None else None
    group = mesh.get_group()

    def filled(name: str, module: torch.nn.Module) -> None:
        localize(module, group)  # this rank's block as a plain tensor, before it is cast or quantized
        if quantizer is not None:
            quantizer.module_filled(name, module)
        elif dtype is not None:
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)

    split_for_inference(model, mesh)
    fill.load(model, plan, device=target, after=filled)
    model.llm.tie_weights()
    if quantizer is not None:
        quantizer.quantize_rest(model)
    return model.eval(), unfilled.processor


def load_tensor_parallel(path: str | os.PathLike, s: Any, check: Callable[[Any], object]) -> Any:
    """The model split over torchrun's processes (``nvlm.distributed.inference``; one GPU each, or gloo on the
    CPU), each reading its own block, after `check` (the memory plan's) passed for its share of `s` (a
    ``nvlm.inference.memory.Serving``, its tp and device set to this process's). Rank 0 gets (model, processor),
    its runners mirrored to the others (``nvlm.distributed.follow``); every other rank follows rank 0's steps
    here until rank 0's command ends, then exits 0."""
    from nvlm.distributed.follow import Steps, follow, mirror_forwards
    from nvlm.distributed.inference import control_group, inference_mesh
    from nvlm.distributed.parallel import init_world, shutdown

    world = init_world(train_device="cpu" if s.device == "cpu" else "cuda")
    if s.tp not in (1, world.size):
        raise UserError(f"--tp {s.tp} but torchrun started {world.size} processes: give --tp {world.size} or omit it")
    s = replace(s, tp=world.size, device=str(world.device))
    check(s)
    mesh, group = inference_mesh(world), control_group()
    atexit.register(shutdown, world)  # after rank 0's Steps.close (exit hooks run last-registered first)
    model, processor = load_sharded(path, mesh, getattr(torch, s.dtype), world.device, s.quantize, s.keep)
    if not world.main:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun passes SIGTERM on; rank 0 drains, then says stop
        n = follow(model, group)
        logging.getLogger("nvlm.distributed").info("rank %d: rank 0 stopped after %d steps; leaving", world.rank, n)
        raise SystemExit(0)
    steps = Steps(group)
    model.tp_steps = steps  # type: ignore[assignment]  # nn.Module types attributes as tensors or modules
    mirror_forwards(model, steps)
    return model, processor
