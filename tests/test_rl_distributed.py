"""GRPO and DPO under torchrun + FSDP2 (2 gloo processes on CPU): each process samples its own prompts' completions
on its shard of the model, and completions of different lengths on the two processes do not hang the run.

python -m pytest tests/test_rl_distributed.py -q
"""

from __future__ import annotations

import json
import traceback

import dist_util
import pytest
from conftest import write_color_dataset
from dist_util import quiet, result

from nvlm.training.config import RunConfig
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import Trainer

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

TIMEOUT_S = 600


def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    dist_util.worker_env(rank, world_size, port)
    from nvlm.distributed.parallel import init_world, shutdown

    world = init_world(timeout_s=120)
    try:
        for job in jobs:
            out: dict = {}
            try:
                trainer = Trainer(RunConfig.from_dict(job["cfg"]), job["out"], log=quiet, world=world, progress=False)
                lengths: list[float] = []
                original = trainer.optimizer_step

                def logged(batches, original=original, trainer=trainer, lengths=lengths):  # type: ignore[no-untyped-def]
                    loss = original(batches)
                    lengths.append(trainer.rl.stats.get("completion_len", 0.0))  # this process's own
                    return loss

                trainer.optimizer_step = logged
                r = trainer.run()
                out.update(steps=r.steps, lengths=lengths)
            except Exception as e:  # noqa: BLE001 - reported to the test process
                out.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
            with open(f"{job['out']}.rank{rank}.json", "w") as f:
                json.dump(out, f)
            if "error" in out:
                raise RuntimeError(out["trace"])
    finally:
        shutdown(world)


def cfg(backbones, data, stage: str, arch: str) -> dict:
    return {
        "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": [{"path": str(data)}], "max_seq_len": 512},
        "train": {"stage": stage, "max_steps": 3, "global_batch_size": 2, "micro_batch_size": 1, "lr": 3e-3,
                  "min_lr": 3e-3, "rl": {"group_size": 4, "max_new_tokens": 12, "rewards": ["format"]}},
    }  # fmt: skip


def test_grpo_and_dpo_on_two_processes_complete(backbones, tmp_path):
    """NVLM-X (x-attn memory K/V in the rollouts' runner) sharded over 2 processes: GRPO, then DPO."""
    data = write_color_dataset(tmp_path, 8, 2) / "images.jsonl"
    pairs = tmp_path / "pairs.jsonl"
    answers = [("red", "blue"), ("green", "red"), ("blue", "green"), ("red", "green")]
    pairs.write_text(
        "".join(
            json.dumps({"prompt": "<image>\nWhat color?", "chosen": c, "rejected": r, "image": f"img/{i}.png"}) + "\n"
            for i, (c, r) in enumerate(answers)
        )
    )
    jobs = [{"cfg": cfg(backbones, data, "grpo", "X"), "out": str(tmp_path / "grpo")},
            {"cfg": cfg(backbones, pairs, "dpo", "X"), "out": str(tmp_path / "dpo")}]  # fmt: skip
    dist_util.spawn(_worker, jobs, 2, TIMEOUT_S)
    for job in ("grpo", "dpo"):
        out = tmp_path / job
        assert result(out, 0)["steps"] == result(out, 1)["steps"] == 3
        rows = read_metrics(out / "metrics.jsonl")
        assert len(rows) == 3 and all(r["tokens"] > 0 and r["loss"] == r["loss"] for r in rows)
