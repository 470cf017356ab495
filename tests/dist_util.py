"""Spawning N gloo worker processes for the scale-out tests (test_distributed, test_tensor_parallel,
test_sharded_load): a free local port, CPU unless there is one GPU per process, and a deadline that turns a hang
into a failed test instead of a blocked suite. Also what the training workers share: joining the process group's
environment, a SIGTERM after a given step, and reading back each process's result and a run's losses."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from nvlm.training.metrics import read_metrics


@contextlib.contextmanager
def cpu_unless_gpus(world_size: int) -> Iterator[None]:
    """The workers (spawned inside) run gloo on CPU unless there is one GPU per process: init_world picks NCCL
    and cuda:LOCAL_RANK whenever CUDA is visible, and rank 1 on a one-GPU machine would ask for cuda:1."""
    if torch.cuda.device_count() >= world_size:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the spawned workers, before they touch CUDA
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def spawn(worker: Callable, jobs: list[dict], world_size: int, timeout_s: float) -> None:
    """Run ``worker(rank, world_size, port, jobs)`` in `world_size` spawned processes; fail after `timeout_s`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with cpu_unless_gpus(world_size):
        ctx = mp.start_processes(
            worker, args=(world_size, port, jobs), nprocs=world_size, join=False, start_method="spawn"
        )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world_size}-process jobs did not finish within {timeout_s} s (a hang)")


# ---- the worker side ---------------------------------------------------------------------------------------
def worker_env(rank: int, world_size: int, port: int) -> None:
    """Set torchrun's variables, which ``init_world`` reads, in a spawned worker; one thread: they share cores."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


def quiet(*args: Any, **kwargs: Any) -> None:
    """A trainer's log that prints nothing."""


def stop_after(trainer: Any, at: int) -> None:
    """Make `trainer` stop as on a SIGTERM seen during step `at` - 1 (it finishes that step, saves and exits)."""
    original = trainer.train_step

    def stop(batches: Any) -> Any:
        out = original(batches)
        if trainer.step == at - 1:
            trainer._stop = True
        return out

    trainer.train_step = stop


# ---- the test side -----------------------------------------------------------------------------------------
def result(out: Path, rank: int = 0) -> dict:
    """What process `rank` wrote for the job whose output is `out`."""
    return json.loads(Path(f"{out}.rank{rank}.json").read_text())


def losses(out: Path) -> list[float]:
    """The logged loss of every step of the run in folder `out`."""
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
