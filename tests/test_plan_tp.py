"""The memory plan at tp > 1 against what a 2-process tensor-parallel run holds per rank (gloo, CPU).

python -m pytest tests/test_plan_tp.py -q

Each rank counts the elements of its trainable and frozen parameters, gradients and AdamW state (a DTensor's
local shard) after one step; ``nvlm.training.plan.memory`` must predict them exactly. The embeddings, LM head
and norms stay whole on each tp rank, as the runtime keeps them. (The activations are not compared here: this
run is fp32 on CPU, where dtype casts the plan counts in bf16 are no-ops.)
"""

from __future__ import annotations

import json
import traceback
from typing import Any

import dist_util
import pytest
import torch
from conftest import picture, write_color_dataset
from dist_util import quiet

from nvlm.training.config import RunConfig

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

TIMEOUT_S = 300


def cfg_dict(backbones, dataset, **train: Any) -> dict:
    return {
        "model": {"arch": "X", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": [{"path": str(dataset / "images.jsonl")}], "max_seq_len": 256},
        "train": {"stage": "sft", "max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1, **train},
    }


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def measure(trainer: Any) -> dict[str, int]:
    """Elements of this rank's parameters, gradients and AdamW moments after one step."""
    proc = trainer.processor
    enc = proc.encode_segments([("<image>\nWhat color? ", False), ("red", True)], [picture(150, 100)])
    trainer.optimizer_step([proc.collate([enc], padding_side="right")])
    params = list(trainer.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    moments = [local(v) for s in trainer.optimizer.state.values() for k, v in s.items() if k.startswith("exp_avg")]
    return {
        "trainable": sum(local(p).numel() for p in trainable),
        "frozen": sum(local(p).numel() for p in params if not p.requires_grad),
        "grads": sum(local(p.grad).numel() for p in trainable if p.grad is not None),
        "moments": sum(m.numel() for m in moments),
    }


def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    dist_util.worker_env(rank, world_size, port)
    from nvlm.distributed.parallel import init_world, shutdown
    from nvlm.training.trainer import Trainer

    world = init_world(timeout_s=120)
    try:
        for job in jobs:
            try:
                trainer = Trainer(RunConfig.from_dict(job["cfg"]), job["out"], log=quiet, world=world)
                out = measure(trainer) if job.get("kind") != "train" else {"steps": trainer.run().steps}
            except Exception:  # noqa: BLE001 - reported to the test process
                out = {"error": traceback.format_exc()}
            with open(f"{job['out']}.rank{rank}.json", "w") as f:
                json.dump(out, f)
    finally:
        shutdown(world)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("plantp"), 4, 0)


def test_plan_at_tp2_matches_what_each_rank_holds(backbones, dataset, tmp_path):
    from nvlm.training.plan import memory, meta_model
    from nvlm.training.trainer import Trainer

    cfg = cfg_dict(backbones, dataset, tp=2)
    dist_util.spawn(_worker, [{"cfg": cfg, "out": str(tmp_path / "tp2")}], 2, TIMEOUT_S)
    ranks = [dist_util.result(tmp_path / "tp2", r) for r in (0, 1)]
    assert all("error" not in r for r in ranks), ranks
    one = measure(Trainer(RunConfig.from_dict(cfg_dict(backbones, dataset)), tmp_path / "one", log=quiet))

    run = RunConfig.from_dict(cfg)
    model = meta_model(run)
    planned = memory(model, run, 1, 2, 1, False)
    for r in ranks:
        assert r["trainable"] == r["grads"] == planned["shard_trainable"], (r, planned["shard_trainable"])
        assert r["moments"] == 2 * planned["shard_trainable"]
        assert r["frozen"] == planned["shard_frozen"]
    embed = model.llm.get_input_embeddings().weight.numel()
    assert ranks[0]["trainable"] > embed + model.llm.get_output_embeddings().weight.numel()  # both whole
    assert one["trainable"] > ranks[0]["trainable"] > one["trainable"] / 2


def test_reduce_scatter_on_the_last_micro_batch_only_trains_the_same(backbones, dataset, tmp_path):
    """train.sync_last_micro_batch (FSDP2 set_requires_gradient_sync) over 2 data-parallel processes with 2
    micro-batches per step: the same losses as reduce-scattering after each micro-batch."""
    jobs = []
    for name, sync_last in (("every", False), ("last", True)):
        run = cfg_dict(backbones, dataset, max_steps=3, global_batch_size=4, sync_last_micro_batch=sync_last)
        jobs.append({"kind": "train", "cfg": run, "out": str(tmp_path / name)})
    dist_util.spawn(_worker, jobs, 2, TIMEOUT_S)
    assert dist_util.result(tmp_path / "last")["steps"] == 3
    every, last = dist_util.losses(tmp_path / "every"), dist_util.losses(tmp_path / "last")
    assert len(every) == 3 and last == pytest.approx(every, rel=1e-5)
