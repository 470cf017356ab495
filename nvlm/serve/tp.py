"""The engine over tensor-parallel processes: rank 0 decides every step, the other ranks follow it.

    # rank 0                                            # every other rank
    steps = Steps(control_group())                      follow(model, control_group())
    engine = Engine(model, processor, runners=steps)    # runs rank 0's steps until it says "stop"

Each rank holds its shard of the model (``nvlm.distributed.inference``) and a ``ModelRunner`` over it. Rank 0
owns HTTP, the queue and the scheduler; its runners are ``MirroredRunner``s, which send each call (a prefill's
host batch, a row leaving, a decoding step, the tokens fed) to the followers before running it, so every rank
runs the same forward on the same rows, and the all-reduces inside it meet. Requests travel as small integer
keys, the batch as the processor's host tensors.

Rank 0 alone samples (its ``OutputProcessor``) and sends the tokens it feeds: one sampler state and one set of
seeded generators, and no reliance on the followers' logits being bitwise equal to rank 0's.

Failures: a step that fails on rank 0 fails on the followers the same way (the same inputs through the same
code) or not at all; either way a follower logs it and waits for the next step, and rank 0's engine replaces
its runner (a new ``MirroredRunner``, which the followers mirror). Rank 0's engine sends "stop" when its worker
ends (server shutdown, a dead worker), and each follower then returns. A failure on one rank only inside a
forward (one GPU out of memory) leaves the others in a collective until its timeout ends the group.
The prefix cache is off under TP: its blocks would be rank 0's heads only.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import torch
import torch.distributed as dist

from nvlm.inference.runner import ModelRunner

log = logging.getLogger("nvlm.serve")


class Steps:
    """Rank 0's side: the runners the engine makes (``steps(model)``), each call sent to the followers first."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._ids = itertools.count()
        self._gone: list[int] = []  # runners rank 0 dropped since the last message: the followers drop them too
        self.stopped = False

    def __call__(self, model: Any) -> MirroredRunner:
        return MirroredRunner(model, self)

    def send(self, runner: int, call: str, *args: Any) -> None:
        if self.stopped:
            raise RuntimeError("the followers were stopped; no step can run")
        gone, self._gone = self._gone, []
        dist.broadcast_object_list([(runner, call, args, gone)], src=0, group=self.group)

    def close(self) -> None:
        """Tell the followers to return (once)."""
        if not self.stopped:
            self.send(-1, "stop")
            self.stopped = True


class MirroredRunner(ModelRunner):
    """A ``ModelRunner`` whose every state-changing call runs on the followers too (``Steps.send``)."""

    def __init__(self, model: Any, steps: Steps) -> None:
        super().__init__(model)
        self.steps, self.id = steps, next(steps._ids)
        steps.send(self.id, "new")
        weakref.finalize(self, steps._gone.append, self.id)  # a list append: safe from the garbage collector

    def prefill(
        self, batch: dict[str, Any], owners: list[Any], all_logits: bool = False, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.steps.send(self.id, "prefill", batch, [id(o) for o in owners], all_logits, _host(features))
        return super().prefill(batch, owners, all_logits, features)

    def extend(
        self, batch: dict[str, Any], owner: Any, start: int, load: Any = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        if load is not None:
            raise RuntimeError("the prefix cache cannot run under tensor parallelism (its blocks are rank 0's)")
        self.steps.send(self.id, "extend", batch, id(owner), start, None, _host(features))
        return super().extend(batch, owner, start, load, features)

    def adopt(self, other: ModelRunner, owner: Any) -> None:
        assert isinstance(other, MirroredRunner), "rows move only between mirrored runners"
        self.steps.send(self.id, "adopt", other.id, id(owner))
        super().adopt(other, owner)

    def feed(self, first: int, tokens: torch.Tensor) -> None:
        self.steps.send(self.id, "feed", first, tokens.cpu())
        super().feed(first, tokens)

    def decode(self) -> torch.Tensor:
        self.steps.send(self.id, "decode")
        return super().decode()

    def release(self, owner: Any) -> None:
        self.steps.send(self.id, "release", id(owner))
        super().release(owner)


def follow(model: Any, group: Any) -> int:
    """A follower's loop: run rank 0's steps on this rank's shard until it sends "stop"; returns the steps run."""
    runners: dict[int, ModelRunner] = {}
    device = model.device
    steps = 0
    with torch.inference_mode():
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            rid, call, args, gone = box[0]
            for g in gone:
                runners.pop(g, None)
            if call == "stop":
                return steps
            if call == "new":
                runners[rid] = ModelRunner(model)
                continue
            steps += 1
            try:
                _run(runners, rid, call, args, device)
            except Exception:  # rank 0 met it too (same inputs, same code): it resets its runner, we wait
                log.exception("follower step %s failed", call)


def _run(runners: dict[int, ModelRunner], rid: int, call: str, args: tuple, device: torch.device) -> None:
    runner = runners[rid]
    if call == "prefill":
        batch, owners, all_logits, features = args
        runner.prefill(batch, owners, all_logits, _on(features, device))
    elif call == "extend":
        batch, owner, start, _, features = args
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


def _host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
