"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), and the final ``from_pretrained`` export.

    checkpoints/step_0000100/
      weights/              DCP: trainable weights and AdamW state, each process writing its own shards
      rng_rank00000.pt …    each process's RNG states
      trainer_state.json    step, world size, each process's data position and counts
      run_config.json       the resolved run config
      COMPLETE              written last

A checkpoint is written into ``step_XXXXXXX.tmp/`` by every process and renamed by process 0 only after all
of them have finished and the marker is on disk, so a run killed mid-save leaves a ``.tmp`` folder that is
never loaded (the folder must be on a file system all processes share). Frozen weights are not saved: they
are the backbones', rebuilt from them. DCP reshards on load, so a run saved on N processes resumes on M
(one process without torchrun included). The same code serves a one-process run.

Periodic saves are written in the background (``CheckpointWriter``, ``train.async_checkpoint``): each process
stages its shards in host memory and returns to training while a thread writes them; process 0 then writes
the marker, renames and deletes old checkpoints off the training thread. The next save, the last one and a
SIGTERM save wait for a pending write first.

A save that fails because the disk is full (``DiskFull``) says so in one line, with the folder and the complete
checkpoint the run can resume from; the failed ``.tmp`` is removed and older checkpoints are untouched (they are
deleted only after a newer one is complete).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nvlm.distributed.parallel import World, all_reduce, barrier
from nvlm.distributed.tensor_parallel import full_tensor
from nvlm.errors import UserError

MARKER = "COMPLETE"
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _gather(obj: Any, world: World) -> list[Any]:
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


class DiskFull(UserError):
    """A checkpoint could not be written: no space left where it goes."""


def _disk_full(error: BaseException, where: Path) -> bool:
    """Whether `error` (or what it wraps: DCP gathers each process's failure into a CheckpointException) is a
    full disk. torch's zip writer loses the errno ("unexpected pos 704 vs 598", "failed writing file"): a failed
    write counts as a full disk when the file system has less than 64 MiB left."""
    seen: list[BaseException] = []
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or e in seen:
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, its traceback)}
        for failure in failures.values() if isinstance(failures, dict) else []:
            todo += failure if isinstance(failure, tuple) else [failure]
        todo += [e.__cause__, e.__context__]
    text = " ".join(str(e) for e in seen)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    torn_write = "unexpected pos" in text or "failed writing" in text
    return torn_write and _free_bytes(where) < 64 * 2**20


def _free_bytes(where: Path) -> int:
    for p in (where, *where.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return 0


def _disk_full_error(root: Path, step: int) -> DiskFull:
    done = complete_checkpoints(root)
    resume = f"the last complete checkpoint is {done[-1]}" if done else "no complete checkpoint yet (step 0)"
    return DiskFull(
        f"disk full: checkpoint of step {step} could not be written to {root} ({_free_bytes(root) // 2**20} MiB "
        f"free); {resume}: free space there and rerun the same command to resume from it"
    )


@contextlib.contextmanager
def _writing(world: World, tmp: Path, root: Path, step: int) -> Iterator[None]:
    """Turn a full disk met by any process into ``DiskFull`` on every process (the others would otherwise wait
    for it in the next collective); the torn ``.tmp`` is removed to give the space back."""
    error: BaseException | None = None
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is one; told to the others, re-raised
        error = e
    full, failed = all_reduce([float(error is not None and _disk_full(error, tmp)), float(error is not None)], world)
    if full:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full_error(root, step) from error
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"another process failed writing the checkpoint of step {step} (see its error)")


class CheckpointWriter:
    """Writes a run's checkpoints; every process holds one. `asynchronous`: the weights and AdamW state are
    copied to host memory and written by a background thread (``dcp.async_save``, coordinating over a gloo
    side process group, so training's own collectives never interleave with it); training goes on meanwhile.
    Process 0 marks a checkpoint complete, renames it and deletes old ones in another thread once the write has
    finished, so no deletion is on the critical path and ``COMPLETE`` never names a half-written checkpoint.
    A save first waits for the previous one (host memory holds at most one staged copy)."""

    def __init__(self, world: World, asynchronous: bool) -> None:
        self.world, self.asynchronous = world, asynchronous
        self._group = dist.new_group(backend="gloo") if asynchronous and world.distributed else None
        if asynchronous and not world.distributed:  # DCP's one-process warning, raised in the writer thread
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        self._pending: Any = None  # the write's future
        self._finisher: threading.Thread | None = None
        self._finish_error: BaseException | None = None
        self._where: tuple[Path, Path, int] = (Path(), Path(), 0)  # the pending save's (tmp, root, step)

    def save(
        self,
        root: Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rank_state: dict[str, Any],
        run_config: dict[str, Any],
        keep_last: int = 2,
        wait: bool = False,
    ) -> Path:
        """Save step `step` (every process calls this); `wait`: return only when it is complete on disk (a
        SIGTERM save: the process exits next)."""
        self.wait()
        world = self.world
        final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(world)
        ranks = _gather(rank_state, world)
        with _writing(world, tmp, root, step):  # the small files first: once the weights are written, it is whole
            self._small_files(tmp, step, ranks, run_config)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_TRAINABLE)
        state_dict, weights = {"model": model_sd, "optim": optim_sd}, str(tmp / "weights")
        self._where = (tmp, root, step)
        if not self.asynchronous:
            with _writing(world, tmp, root, step), _one_process_ok():
                dcp.save(state_dict, checkpoint_id=weights, no_dist=not world.distributed)
            with _writing(world, tmp, root, step):  # every process's shards are on disk
                if world.main:
                    _complete(tmp, final, root, keep_last)
            return final
        with _one_process_ok():  # returns once the state is copied to host memory; the write goes on
            self._pending = dcp.async_save(
                state_dict, checkpoint_id=weights, process_group=self._group, no_dist=not world.distributed
            )
        if world.main:  # DCP's coordinator resolves its future after every process's write has finished
            self._finisher = threading.Thread(
                target=self._finish, args=(self._pending, tmp, final, root, keep_last), name="checkpoint-finish"
            )
            self._finisher.start()
        if wait:
            self.wait()
        return final

    def _small_files(self, tmp: Path, step: int, ranks: list[Any], run_config: dict[str, Any]) -> None:
        """Each process's RNG states; process 0's trainer state (every process's data position) and config."""
        world = self.world
        rng = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(rng, tmp / f"rng_rank{world.rank:05d}.pt")
        if world.main:
            state = {"step": step, "world_size": world.size, "ranks": ranks}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))

    def _finish(self, pending: Any, tmp: Path, final: Path, root: Path, keep_last: int) -> None:
        try:
            pending.result()
            _complete(tmp, final, root, keep_last)
        except BaseException as e:  # noqa: BLE001 - a failed write is never marked; wait() raises its error
            self._finish_error = e

    def wait(self) -> None:
        """Block until the pending save (if any) is written and, on process 0, marked complete."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        with _writing(self.world, *self._where):
            if self._finisher is not None:
                self._finisher.join()
                self._finisher = None
            pending.result()
            error, self._finish_error = self._finish_error, None
            if error is not None:  # process 0's marker or rename
                raise error


def _complete(tmp: Path, final: Path, root: Path, keep_last: int) -> None:
    """Process 0, once every process's shards are on disk: mark, publish, then delete checkpoints past
    `keep_last`."""
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one file system: a reader sees all of it or none
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp") and (p / MARKER).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """Restore trainable weights, AdamW state and RNG from `path` (saved on any number of processes).

    Returns {"step", "world_size", "ranks", "rank_state"}: every process's saved data state, and this
    process's own when the world size is the one saved, else None (the caller then continues from the
    furthest position any process had reached)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_TRAINABLE)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    try:
        with _one_process_ok():
            dcp.load(state, checkpoint_id=str(path / "weights"), no_dist=not world.distributed)
    except Exception as e:  # DCP names the missing keys; say what it means
        raise ValueError(
            f"checkpoint {path} does not match this run's trainable weights ({e}); was it written by "
            "a different stage or model? Use a new --out folder."
        ) from e
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )  # frozen: the backbones'
    trainer = json.loads((path / "trainer_state.json").read_text())
    same = trainer["world_size"] == world.size
    rng_file = path / f"rng_rank{world.rank if same else 0:05d}.pt"
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    if rng["cuda"] and torch.cuda.is_available() and same:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return {
        "step": trainer["step"],
        "world_size": trainer["world_size"],
        "ranks": trainer["ranks"],
        "rank_state": trainer["ranks"][world.rank] if same else None,
    }


def export_pretrained(
    model: nn.Module, processor: Any, path: Path, world: World, dtype: torch.dtype | None = None
) -> None:
    """Write the (possibly sharded) model and its processor as an ordinary ``nvlm.load`` folder from process 0.

    Weights are gathered one tensor at a time onto process 0's CPU (cast to `dtype` if given, e.g. bf16 after
    a bf16 run: the fp32 optimizer copy stays in the DCP checkpoints), so its host memory holds the model
    once, never a second full copy."""
    from nvlm.models.saving import save_pretrained

    full: dict[str, torch.Tensor] | None = None
    if world.distributed or dtype is not None:
        full = {}
        for name, tensor in model.state_dict().items():
            value = full_tensor(tensor)  # a DTensor shard: every process takes part
            if world.main:
                cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
                full[name] = value.detach().to("cpu", cast)
            del value
    if world.main:  # written aside and renamed: a half-written final/ is never loaded (e.g. by stage 2)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp, state_dict=full)
        processor.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(world)
