"""Tensor-parallel inference driven from rank 0: rank 0 runs the command (the server's engine, ``generate`` for
``nvlm chat`` and ``nvlm eval run``); the other ranks follow its model runners' steps.

    # rank 0                                          # every other rank
    model.tp_steps = Steps(control_group())           follow(model, control_group())   # until rank 0's "stop"
    ... any ModelRunner(model) mirrors its calls ...
    model.tp_steps.close()

Each rank holds its shard of the model (``nvlm.distributed.inference``). On rank 0 every ``ModelRunner`` over a
model that carries ``tp_steps`` sends each call that runs the model or changes its rows (a prefill's host batch,
a prompt's next chunk, a row moving or leaving, a decoding step, the tokens fed) before running it, so every
rank runs the same forward on the same rows and the all-reduces inside meet; a forward outside a runner (an
eval's scoring pass) is sent as it is called (``mirror_forwards``). Requests travel as integer keys,
batches as the processor's host tensors. Rank 0 owns HTTP, the queue and the scheduler; nothing else crosses.

Rank 0 alone samples and sends the tokens it feeds: one sampler state and one set of seeded generators, and no
reliance on the followers' logits being bitwise equal to rank 0's (they are, after the all-reduce, but a
sampler need not be told so).

Failures: a step that fails on rank 0 fails the same way on the followers (the same inputs through the same code)
or not at all; a follower logs it and waits for the next step, while rank 0's engine starts a fresh runner,
which the followers mirror. "stop" is sent once, when rank 0's command ends (also on an exception: an exit
hook); a rank 0 that dies closes its connections, which ends the followers' wait with an error. A failure on
one rank only inside a forward (one GPU out of memory) leaves the others in a collective until its timeout.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
from typing import Any

import torch
import torch.distributed as dist

from nvlm.inference.runner import ModelRunner

log = logging.getLogger("nvlm.distributed")


class Steps:
    """Rank 0's channel to the followers (a gloo group): each mirrored call, then "stop"."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._ids = itertools.count()
        self._gone: list[int] = []  # runners rank 0 dropped since the last message: the followers drop them too
        self._lock = threading.Lock()  # the engine's worker and the exit path may both send
        self.stopped = False
        atexit.register(self.close)

    def new_runner(self) -> int:
        """A key for a new runner, announced to the followers."""
        key = next(self._ids)
        self.send(key, "new")
        return key

    def gone(self, key: int) -> None:
        """A runner was dropped (called by the garbage collector: a list append, nothing sent)."""
        self._gone.append(key)

    def send(self, runner: int, call: str, *args: Any) -> None:
        """Broadcast one call (its tensors copied to the host first)."""
        with self._lock:
            if self.stopped:
                raise RuntimeError("the tensor-parallel followers have stopped; no step can run")
            gone, self._gone = self._gone, []
            dist.broadcast_object_list([(runner, call, _host(args), gone)], src=0, group=self.group)

    def close(self) -> None:
        """Tell the followers to return (once; later calls do nothing)."""
        if self.stopped or not dist.is_initialized():
            return
        try:
            self.send(-1, "stop")
        finally:
            self.stopped = True


def mirror_forwards(model: Any, steps: Steps) -> None:
    """Rank 0: a forward of `model` outside a runner (a runner's passes its ``KVPool``), e.g. an eval's one-pass
    scoring of answer letters or ``generate(use_cache=False)``, runs on the followers too."""
    from nvlm.inference.kv_cache import KVPool

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if not isinstance(kwargs.get("past_key_values"), KVPool):
            steps.send(-1, "forward", args, kwargs)

    model.register_forward_pre_hook(hook, with_kwargs=True)


def follow(model: Any, group: Any) -> int:
    """A follower's loop: run rank 0's steps on this rank's shard until it sends "stop"; returns the steps run."""
    runners: dict[int, ModelRunner] = {}
    device = model.device
    steps = 0
    with torch.inference_mode():
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            key, call, args, gone = box[0]
            for g in gone:
                runners.pop(g, None)
            if call == "stop":
                return steps
            if call == "new":
                runners[key] = ModelRunner(model)
                continue
            if call == "forward":
                model(*args[0], **args[1])
                continue
            steps += 1
            try:
                _run(runners, key, call, args, device)
            except Exception:  # rank 0 met it too (same inputs, same code): it starts a fresh runner; we wait
                log.exception("follower step %s failed", call)


def _run(runners: dict[int, ModelRunner], key: int, call: str, args: tuple, device: torch.device) -> None:
    runner = runners[key]
    if call == "prefill":
        batch, owners, all_logits, features = args
        runner.prefill(batch, owners, all_logits, _on(features, device))
    elif call == "extend":
        batch, owner, start, features = args
        runner.extend(batch, owner, start, None, _on(features, device))
    elif call == "adopt":
        runner.adopt(runners[args[0]], args[1])
    elif call == "feed":
        runner.feed(args[0], args[1].to(device))
    elif call == "decode":
        runner.decode()
    elif call == "release":
        runner.release(args[0])
    else:
        raise ValueError(f"unknown step {call!r}")


def _host(x: Any) -> Any:
    """`x` with every tensor inside (tuples, lists, dicts) on the host, so that the message pickles anywhere."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_host(v) for v in x)
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    return x


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
