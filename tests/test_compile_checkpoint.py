"""train.compile with activation checkpointing: checkpoint wrapper, then compile, then fully_shard.

python -m pytest tests/test_compile_checkpoint.py -q

Before, compiling each decoder layer's forward (the x-attn wrapper's included, checkpoint call and all) silently
dropped activation checkpointing. Here, on one gloo process with FSDP2 and torch.compile's "aot_eager" backend
(CPU, no C compiler needed): with both on, every compiled layer and x-attn block runs twice per step (forward,
then its recomputation in backward), the activations kept for backward shrink, and gradients equal the
plain (no compile, no checkpointing) run's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import picture, write_color_dataset

from nvlm.distributed.parallel import World, compile_targets
from nvlm.training.config import RunConfig
from nvlm.training.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("cdata"), 4, 4)


@pytest.fixture(scope="module")
def world():
    """A one-process gloo group in this process: FSDP2 and the mesh run as under torchrun."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield World(distributed=True)
    dist.destroy_process_group()


def step(backbones, dataset, tmp_path, world, arch, compile, ac):
    """One training micro-batch (an image sample, x-attn gates opened); returns (calls per compiled LLM module,
    bytes saved for backward outside checkpointed regions, full gradients, compiled graphs)."""
    sources = [{"path": str(dataset / "images.jsonl")}]
    cfg = RunConfig.from_dict(
        {
            "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": sources, "max_seq_len": 256},
            "train": {"stage": "sft", "max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1},
        }
    )
    cfg.train.compile, cfg.train.activation_checkpointing = compile, ac
    trainer = Trainer(cfg, tmp_path / f"{arch}-{compile}-{ac}", log=lambda *a, **k: None, world=world)
    model = trainer.model
    with torch.no_grad():
        for block in model.xattn:
            block.gate_attn.fill_(0.5)
            block.gate_ffn.fill_(0.5)
    calls = []
    for i, m in enumerate(compile_targets(model)):
        calls.append(0)
        inner = m.forward  # the compiled function when compile is on

        def counted(*args, _inner=inner, _i=i, **kwargs):
            calls[_i] += 1
            return _inner(*args, **kwargs)

        m.forward = counted
    compiled = all(
        hasattr(m.forward.__kwdefaults__["_inner"], "_torchdynamo_orig_callable") for m in compile_targets(model)
    )
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    proc = model.processor
    enc = proc.encode_segments([("<image>\nWhat color? ", False), ("red", True)], [picture(150, 100)])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step([proc.collate([enc], padding_side="right")])
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the vision layers and the projector come last among the targets; activation checkpointing (decoder
    # layers and their blocks) leaves them alone, so they run once either way
    tower = len(model.vision.layers) + 1
    assert set(calls[-tower:]) == {1}, calls
    return calls[:-tower], saved[0], grads, compiled


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_compile_keeps_checkpointing(backbones, dataset, tmp_path, world, arch, monkeypatch):
    # aot_eager: no C compiler, seconds per graph; NVLM_TEST_COMPILE_BACKEND=inductor checks the GPU default's
    monkeypatch.setenv("NVLM_COMPILE_BACKEND", os.environ.get("NVLM_TEST_COMPILE_BACKEND", "aot_eager"))
    plain_calls, plain_saved, plain, was_compiled = step(backbones, dataset, tmp_path, world, arch, False, False)
    assert not was_compiled and set(plain_calls) == {1}  # no checkpointing: each module runs once
    calls, saved_compiled, grads_compiled, was_compiled = step(backbones, dataset, tmp_path, world, arch, True, False)
    assert was_compiled and set(calls) == {1}
    calls, saved, grads, was_compiled = step(backbones, dataset, tmp_path, world, arch, True, True)
    assert was_compiled
    eager_calls, eager_saved, _, _ = step(backbones, dataset, tmp_path, world, arch, False, True)
    print(
        f"{arch}: calls per compiled module: compile+AC {sorted(set(calls))}, AC only {sorted(set(eager_calls))}, "
        f"neither {sorted(set(plain_calls))}; bytes saved for backward: none {plain_saved}, compile "
        f"{saved_compiled}, AC {eager_saved}, compile+AC {saved}"
    )
    assert set(calls) == {2} and set(eager_calls) == {2}  # forward, then recomputed in backward
    assert saved < saved_compiled and saved < plain_saved  # the recomputed blocks' activations were not kept
    worst = max(float((grads[k] - plain[k]).abs().max()) for k in plain)
    assert worst <= 1e-5 * max(float(g.abs().max()) for g in plain.values()), worst
    assert max(float((grads_compiled[k] - plain[k]).abs().max()) for k in plain) <= 1e-4
