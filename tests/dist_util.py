"""Spawning N gloo worker processes for the scale-out tests (test_distributed, test_tensor_parallel,
test_sharded_load): a free local port, CPU unless there is one GPU per process, and a deadline that turns a hang
into a failed test instead of a blocked suite."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.multiprocessing as mp


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
