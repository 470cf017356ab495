"""Background checkpoints (``train.async_checkpoint``): a save returns while its write goes on; the
next save waits for it; ``COMPLETE`` and the deletion of old checkpoints come only after the write finished;
what was saved in the background resumes exactly.

python -m pytest tests/test_async_checkpoint.py -q
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch
import torch.distributed.checkpoint as torch_dcp
from torch import nn

from nvlm.distributed.dcp import MARKER, CheckpointWriter, complete_checkpoints, load_checkpoint
from nvlm.distributed.parallel import World


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).square().sum().backward()
    opt.step()
    return model, opt


def test_background_saves_wait_mark_delete_and_resume(tmp_path, monkeypatch):
    gates: list[threading.Event] = []
    real = torch_dcp.async_save

    def held_async_save(*args, **kwargs):  # the real write, reported done only when the test opens its gate
        gate = threading.Event()
        gates.append(gate)
        inner, outer = real(*args, **kwargs), Future()

        def report():
            gate.wait()
            outer.set_result(inner.result())

        threading.Thread(target=report, daemon=True).start()
        return outer

    monkeypatch.setattr(torch_dcp, "async_save", held_async_save)
    root = tmp_path / "checkpoints"
    writer = CheckpointWriter(World(), asynchronous=True)
    model, opt = trained(0)

    def save(step: int) -> None:
        writer.save(root, step, model, opt, {"data": step}, {}, keep_last=1)

    save(1)
    assert not (root / "step_0000001").exists()  # pending: not published
    gates[0].set()
    writer.wait()
    assert complete_checkpoints(root) == [root / "step_0000001"]

    save(2)  # held: training goes on
    assert (root / "step_0000002.tmp").is_dir() and not (root / "step_0000002.tmp" / MARKER).exists()
    assert complete_checkpoints(root) == [root / "step_0000001"]  # the old one is kept until 2 is complete

    third = threading.Thread(target=save, args=(3,))
    third.start()
    third.join(timeout=1.0)
    assert third.is_alive(), "a save while the previous one is pending must wait for it"
    assert not (root / "step_0000003.tmp").exists()
    gates[1].set()
    third.join(timeout=30)
    assert not third.is_alive()
    assert complete_checkpoints(root) == [root / "step_0000002"]  # 2 complete, then 1 deleted (keep_last=1)
    model.zero_grad()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    gates[2].set()
    writer.wait()
    assert complete_checkpoints(root) == [root / "step_0000003"]

    fresh, fresh_opt = trained(1)  # other weights, other AdamW state
    state = load_checkpoint(root / "step_0000003", fresh, fresh_opt, World())
    assert state["step"] == 3 and state["rank_state"] == {"data": 3}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[p][key], opt.state[q][key])
