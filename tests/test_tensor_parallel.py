"""Tensor parallelism (DTensor column/row plans) composed with FSDP2 on a 2-D mesh, on CPU with gloo.

python -m pytest tests/test_tensor_parallel.py -q

Two processes with train.tp=2 (dp_shard 1) must train as one process does: same losses, gradients and
updated weights within float tolerance, for NVLM-D, -X and -H. One spawn runs every 2-process job, guarded
by a timeout (a hang fails the test). The layout and head checks are unit-tested without processes.
"""

from __future__ import annotations

import json
import os
import traceback

import dist_util
import pytest
import torch
from conftest import picture, write_color_dataset
from dist_util import losses, quiet, result, stop_after

from nvlm.config import ConfigError
from nvlm.distributed.tensor_parallel import check_heads, layout, tp_plans
from nvlm.training.config import RunConfig
from nvlm.training.trainer import Trainer

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

TIMEOUT_S = 420
STEPS = 3


def cfg_dict(backbones, dataset, arch: str, **train) -> dict:
    sources = [{"path": str(dataset / "images.jsonl")}, {"path": str(dataset / "text.jsonl")}]
    return {
        "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": sources, "max_seq_len": 256},
        "train": {
            "stage": "sft",
            "max_steps": STEPS,
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 1,
            "collective_timeout_s": 120,
            **train,
        },
    }


def one_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The full gradients of one fixed image micro-batch (gathered from TP and FSDP shards), with the x-attn gates
    opened so that every block weight (the per-head q/k norms too) gets a gradient."""
    with torch.no_grad():
        for block in trainer.model.xattn:
            block.gate_attn.fill_(0.5)
            block.gate_ffn.fill_(0.5)
    proc = trainer.processor
    enc = proc.encode_segments([("<image>\nWhat color? ", False), ("red", True)], [picture(150, 100)])
    trainer.train_step([proc.collate([enc], padding_side="right")])
    grads = {}
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


# ---- the worker side ---------------------------------------------------------------------------------------
def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    dist_util.worker_env(rank, world_size, port)
    from nvlm.distributed.parallel import init_world, shutdown

    world = init_world(timeout_s=120)
    try:
        for job in jobs:
            result: dict = {}
            try:
                trainer = Trainer(RunConfig.from_dict(job["cfg"]), job["out"], log=quiet, world=world)
                result["layout"] = [trainer.world.tp, trainer.world.dp_size, trainer.world.dp_rank]
                if job["kind"] == "grads":
                    grads = one_step_grads(trainer)
                    if world.main:
                        from safetensors.torch import save_file

                        save_file({n: g.contiguous() for n, g in grads.items()}, f"{job['out']}.grads.safetensors")
                else:
                    if job.get("stop_at") is not None:  # a SIGTERM seen after step stop_at - 1
                        stop_after(trainer, job["stop_at"])
                    r = trainer.run()
                    result.update(steps=r.steps, counts=r.counts)
            except Exception as e:  # noqa: BLE001 - reported to the test process
                result["error"] = f"{type(e).__name__}: {e}"
                result["trace"] = traceback.format_exc()
            with open(f"{job['out']}.rank{rank}.json", "w") as f:
                json.dump(result, f)
            if "error" in result:
                raise RuntimeError(result["trace"])
    finally:
        shutdown(world)


def spawn(jobs: list[dict], world_size: int = 2) -> None:
    dist_util.spawn(_worker, jobs, world_size, TIMEOUT_S)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("tpdata"), 8, 8)


@pytest.fixture(scope="module")
def runs(backbones, dataset, tmp_path_factory):
    """Every 2-process TP job of this module, in one spawn."""
    root = tmp_path_factory.mktemp("tpruns")
    jobs = []
    for arch in ("D", "X", "H"):
        jobs.append({"kind": "train", "cfg": cfg_dict(backbones, dataset, arch, tp=2), "out": str(root / f"tp-{arch}")})
        jobs.append({"kind": "grads", "cfg": cfg_dict(backbones, dataset, arch, tp=2), "out": str(root / f"g-{arch}")})
    resume = cfg_dict(backbones, dataset, "X", tp=2, max_steps=4, save_every=2)
    jobs += [
        {"kind": "train", "cfg": resume, "out": str(root / "straight")},
        {"kind": "train", "cfg": resume, "out": str(root / "stopped"), "stop_at": 2},
        {"kind": "train", "cfg": resume, "out": str(root / "stopped")},  # resumes from the 2-D sharded checkpoint
    ]
    spawn(jobs)
    return root


# ---- the tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_tp2_equals_one_process(runs, backbones, dataset, tmp_path, arch):
    """TP 2 × dp_shard 1: the same samples, losses, gradients and exported weights as one process."""
    from safetensors.torch import load_file

    import nvlm

    assert result(runs / f"tp-{arch}", 0)["layout"] == [2, 1, 0]
    assert result(runs / f"tp-{arch}", 1)["layout"] == [2, 1, 0]  # both processes read data-parallel share 0
    one = Trainer(RunConfig.from_dict(cfg_dict(backbones, dataset, arch)), tmp_path / "one", log=quiet)
    g1 = one_step_grads(one)
    g2 = load_file(f"{runs / f'g-{arch}'}.grads.safetensors")
    assert g1.keys() == g2.keys()
    grad_diff = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    scale = max(float(g.abs().max()) for g in g1.values())
    assert all(float(g1[k].abs().max()) > 0 for k in g1 if "xattn" in k and "norm" in k)

    one = Trainer(RunConfig.from_dict(cfg_dict(backbones, dataset, arch)), tmp_path / "run", log=quiet)
    one.run()
    two = runs / f"tp-{arch}"
    l1, l2 = losses(tmp_path / "run"), losses(two)
    loss_diff = max(abs(a - b) for a, b in zip(l1, l2))
    s1 = nvlm.from_pretrained(tmp_path / "run" / "final").state_dict()
    s2 = nvlm.from_pretrained(two / "final").state_dict()
    assert s1.keys() == s2.keys()
    weight_diff, worst = max((float((s1[k] - s2[k]).abs().max()), k) for k in s1)
    print(
        f"{arch}: TP2 vs 1 max |Δloss| {loss_diff:.2e}, |Δgrad| {grad_diff:.2e} (max |grad| {scale:.2e}), "
        f"|Δweight| after {STEPS} steps {weight_diff:.2e} ({worst})"
    )
    assert len(l1) == len(l2) == STEPS
    assert loss_diff <= 1e-5 * max(abs(x) for x in l1), (l1, l2)
    assert grad_diff <= 1e-5 * scale + 1e-7, grad_diff
    assert weight_diff < 1e-4, weight_diff  # AdamW turns float-rounding gradient differences into ~lr·1e-3
    assert result(two)["counts"]["used"] == STEPS * 2  # the TP group read one share of samples, counted once


def test_layout_fills_the_world_and_names_the_fix():
    assert layout(8, 8, -1) == (8, 1)
    assert layout(128, 8, -1) == (8, 16)
    assert layout(4, 2, 2) == (2, 2)
    assert layout(2, 1, -1) == (1, 2)
    with pytest.raises(ConfigError, match="train.tp=3 does not divide the 8 processes"):
        layout(8, 3, -1)
    with pytest.raises(ConfigError, match="set train.dp_shard=2 or -1"):
        layout(8, 4, 4)  # train.tp and train.dp_shard on their own: the run config checks them (test_config)


def test_tp_must_split_the_heads(build_model):
    model, processor = build_model("X")  # tiny Qwen2: 4 query heads, 2 K/V heads; x-attn blocks the same
    check_heads(model, 2)
    with pytest.raises(
        ConfigError, match=r"train.tp=4 does not divide .*num_key_value_heads.*use train.tp in \[1, 2\]"
    ):
        check_heads(model, 4)


def test_tp_plan_names_exist_in_every_layer_and_block(build_model):
    """The plan's submodule names (transformers' base_model_tp_plan naming) resolve in D, X and H models."""
    for arch in ("D", "X", "H"):
        model, processor = build_model(arch)
        plans = tp_plans(model)
        assert len(plans) == model.llm.config.num_hidden_layers + len(model.xattn)
        for _, module, plan in plans:
            for name in plan:
                assert isinstance(module.get_submodule(name), (torch.nn.Linear, torch.nn.RMSNorm))


# ---- process-group start-up: timeouts and NCCL's flight recorder ------------------------------------------
def test_init_world_starts_long_then_steps_with_the_configured_timeout(monkeypatch, tmp_path):
    """The start-up timeout reaches init_process_group, the flight recorder variables are set (a user's own
    value kept), and start_steps lowers every group's timeout to train.collective_timeout_s."""
    from datetime import timedelta

    import torch.distributed as dist

    from nvlm.distributed import parallel

    seen: dict = {}
    real_init = dist.init_process_group

    def fake_init(backend, timeout, device_id=None):
        seen.update(backend=backend, timeout=timeout)
        real_init(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)

    for k in (
        "TORCH_FR_BUFFER_SIZE",
        "TORCH_NCCL_TRACE_BUFFER_SIZE",
        "TORCH_NCCL_DUMP_ON_TIMEOUT",
        "TORCH_FR_DUMP_TEMP_FILE",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "500")  # the user's choice wins
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", fake_init)
    world = parallel.init_world(120, dump_dir=tmp_path / "fr")
    try:
        assert seen == {"backend": "gloo", "timeout": timedelta(seconds=parallel.STARTUP_TIMEOUT_S)}
        assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
        assert os.environ["TORCH_FR_BUFFER_SIZE"] == "500" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ
        assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "fr" / "rank_")
        assert (tmp_path / "fr").is_dir()
        world = parallel.with_layout(world, 1, -1)
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert backend.options._timeout == timedelta(seconds=parallel.STARTUP_TIMEOUT_S)
        parallel.start_steps(world)
        assert backend.options._timeout == timedelta(seconds=120)
        tp_group = world.mesh.get_group("tp")._get_backend(torch.device("cpu"))
        assert tp_group.options._timeout == timedelta(seconds=120)
    finally:
        dist.destroy_process_group()


def test_tp2_resumes_exactly(runs):
    """A TP run stopped after step 2 and resumed from its DCP checkpoint (weights and AdamW state as 2-D
    DTensors) takes the steps the uninterrupted run took."""
    straight, resumed = losses(runs / "straight"), losses(runs / "stopped")
    assert len(straight) == len(resumed) == 4
    assert resumed == straight, (resumed, straight)
