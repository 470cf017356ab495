"""Scale-out invariants on CPU: 2 processes (gloo, FSDP2, DCP) against 1 process.

python -m pytest tests/test_distributed.py -q

One spawn of 2 worker processes runs a list of jobs (training runs into their own folders); the test process
then compares their metrics with one-process runs of the same recipes. Every spawn is guarded by a timeout: a
hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import traceback

import dist_util
import pytest
import torch
from conftest import picture, write_color_dataset
from dist_util import losses, quiet, result, stop_after

from nvlm.distributed.dcp import complete_checkpoints
from nvlm.training.config import RunConfig
from nvlm.training.trainer import Trainer, build_model

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Half image samples, half text-only, so that steps mix them across processes."""
    return write_color_dataset(tmp_path_factory.mktemp("ddata"), 24, 24)


def cfg_dict(backbones, dataset, arch="D", stage="sft", steps=5, broken=False, **train) -> dict:
    sources = [{"path": str(dataset / "images.jsonl")}, {"path": str(dataset / "text.jsonl")}]
    data = {"sources": sources, "max_seq_len": 256}
    if broken:
        data.update(sources=[*sources, {"path": str(dataset / "broken.jsonl"), "weight": 4}], max_bad_in_row=0)
    return {
        "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": data,
        "train": {
            "stage": stage,
            "max_steps": steps,
            "global_batch_size": 4,
            "micro_batch_size": 1,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 1,
            "collective_timeout_s": 120,
            **train,
        },
    }


# ---- the worker side ---------------------------------------------------------------------------------------
def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    dist_util.worker_env(rank, world_size, port)
    from nvlm.distributed.parallel import barrier, init_world, shutdown

    world = init_world(timeout_s=120)
    try:
        for job in jobs:
            result: dict = {}
            if job["kind"] == "copy":
                if world.main:
                    shutil.copytree(job["src"], job["dst"])
                barrier(world)
                continue
            cfg = RunConfig.from_dict(job["cfg"])
            try:
                trainer = Trainer(cfg, job["out"], log=quiet, world=world)
                result["optimizer_params"] = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
                result["trainable_params"] = sum(1 for p in trainer.model.parameters() if p.requires_grad)
                if job.get("stop_at") is not None and rank == world_size - 1:  # SIGTERM seen by the last process only
                    stop_after(trainer, job["stop_at"])
                if job["kind"] == "grads":  # one step's full gradients, gathered from the shards
                    proc = trainer.processor
                    enc = proc.encode_segments(
                        [(f"<image>\nWhat color? {rank}", False), ("red", True)], [picture(150, 100, seed=rank)]
                    )
                    trainer.train_step([proc.collate([enc], padding_side="right")])
                    grads = {n: p.grad.full_tensor() for n, p in trainer.model.named_parameters() if p.requires_grad}
                    if world.main:
                        from safetensors.torch import save_file

                        save_file({n: g.contiguous() for n, g in grads.items()}, f"{job['out']}.grads.safetensors")
                elif job["kind"] == "mixed":  # process 0 holds only text, process 1 only images
                    proc = trainer.processor
                    if rank == 0:
                        enc = proc.encode_segments([("What is 2+2? ", False), ("4", True)], [])
                    else:
                        enc = proc.encode_segments(
                            [("<image>\nWhat color? ", False), ("red", True)], [picture(150, 100)]
                        )
                    loss, norm, tokens = trainer.train_step([proc.collate([enc], padding_side="right")])
                    trainer.optimizer.step()
                    result.update(loss=loss, norm=norm, tokens=tokens, mixed=trainer.mixed)
                else:
                    r = trainer.run()
                    result.update(steps=r.steps, interrupted=r.interrupted, counts=r.counts)
            except Exception as e:  # noqa: BLE001 - reported to the test process
                result["error"] = f"{type(e).__name__}: {e}"
                result["trace"] = traceback.format_exc()
            with open(f"{job['out']}.rank{rank}.json", "w") as f:
                json.dump(result, f)
            if "error" in result and not job.get("expect_error"):
                raise RuntimeError(result["trace"])
            if job.get("expect_error"):
                break  # the process group may be unusable after a failed step
    finally:
        shutdown(world)


def spawn(jobs: list[dict], world_size: int = 2) -> None:
    dist_util.spawn(_worker, jobs, world_size, TIMEOUT_S)


def close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


# ---- the tests ---------------------------------------------------------------------------------------------
def tied_bf16_llm(backbones, root):
    """The tiny Qwen2 with tied input/output embeddings, saved in bf16 as real checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(backbones["qwen2"])
    llm.config.tie_word_embeddings = True
    llm.tie_weights()
    out = root / "llm-tied-bf16"
    llm.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(backbones["qwen2"]).save_pretrained(out)
    return out


def lora_cfg_dict(backbones, dataset) -> dict:
    """NVLM-H with PEFT LoRA on the LLM and special-token tags (their embedding rows train)."""
    cfg = cfg_dict(backbones, dataset, "H", lora={"r": 4, "alpha": 8.0})
    cfg["model"]["overrides"] = {"tags.mode": "special"}
    return cfg


@pytest.fixture(scope="module")
def runs(backbones, dataset, tmp_path_factory):
    """All 2-process jobs of this module in one spawn (process start-up dominates on 2 cores)."""
    root = tmp_path_factory.mktemp("druns")
    tied = cfg_dict(backbones, dataset, "H", steps=2)
    tied["model"]["llm"] = str(tied_bf16_llm(backbones, root))
    jobs = [
        {"kind": "train", "cfg": cfg_dict(backbones, dataset, arch), "out": str(root / f"two-{arch}")}
        for arch in ("D", "X", "H")
    ]
    jobs.append({"kind": "train", "cfg": tied, "out": str(root / "two-tied-bf16")})
    jobs.append(
        {
            "kind": "train",
            "cfg": cfg_dict(backbones, dataset, "X", activation_checkpointing=True),
            "out": str(root / "two-X-ac"),
        }
    )
    jobs.append(
        {
            "kind": "train",
            "cfg": cfg_dict(backbones, dataset, "H", stage="pretrain", steps=3),
            "out": str(root / "two-H-pretrain"),
        }
    )
    for arch in ("D", "X", "H"):  # gradients of one step with and without activation checkpointing
        for ac in (False, True):
            jobs.append(
                {
                    "kind": "grads",
                    "out": str(root / f"grads-{arch}-{ac}"),
                    "cfg": cfg_dict(backbones, dataset, arch, activation_checkpointing=ac),
                }
            )
    jobs.append({"kind": "train", "cfg": lora_cfg_dict(backbones, dataset), "out": str(root / "two-H-lora")})
    resume = cfg_dict(backbones, dataset, "X", steps=6, save_every=3)
    jobs += [
        {"kind": "train", "cfg": resume, "out": str(root / "straight")},
        {"kind": "train", "cfg": resume, "out": str(root / "stopped"), "stop_at": 3},
        {"kind": "copy", "src": str(root / "stopped"), "dst": str(root / "one-proc-resume")},
        {"kind": "train", "cfg": resume, "out": str(root / "stopped")},
        {"kind": "mixed", "cfg": cfg_dict(backbones, dataset, "H"), "out": str(root / "mixed")},
        {
            "kind": "train",
            "cfg": cfg_dict(backbones, dataset, "D", broken=True),
            "out": str(root / "broken"),
            "expect_error": True,
        },
    ]
    spawn(jobs)
    return root


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_two_processes_equal_one(runs, backbones, dataset, tmp_path, arch):
    one = tmp_path / "one"
    Trainer(RunConfig.from_dict(cfg_dict(backbones, dataset, arch)), one, log=quiet).run()
    two = runs / f"two-{arch}"
    assert close(losses(two), losses(one)), (losses(two), losses(one))
    counts = result(two)["counts"]
    assert counts["used"] == 5 * 4 and counts["used_text_only"] > 0 and counts["used_with_images"] > 0
    assert counts["mixed_microbatches"] > 0  # some micro-batches had images on one process only
    # the exported final model equals the one-process one
    import nvlm

    m1, m2 = nvlm.from_pretrained(one / "final"), nvlm.from_pretrained(two / "final")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    worst = max(float((s1[k] - s2[k]).abs().max()) for k in s1)
    assert worst < 1e-4, worst


def test_lora_two_processes_equal_one(runs, backbones, dataset, tmp_path):
    """LoRA under FSDP2: frozen base and adapters in the same units; losses and the exported adapter match."""
    import nvlm

    one = tmp_path / "one"
    Trainer(RunConfig.from_dict(lora_cfg_dict(backbones, dataset)), one, log=quiet).run()
    two = runs / "two-H-lora"
    assert close(losses(two), losses(one)), (losses(two), losses(one))
    assert (two / "final" / "llm_adapter" / "adapter_model.safetensors").is_file()
    s1, s2 = nvlm.from_pretrained(one / "final").state_dict(), nvlm.from_pretrained(two / "final").state_dict()
    assert s1.keys() == s2.keys() and any(".lora_A." in k for k in s1)
    worst = max(float((s1[k] - s2[k]).abs().max()) for k in s1)
    assert worst < 1e-5, worst


def test_activation_checkpointing_under_fsdp_keeps_the_losses(runs):
    assert close(losses(runs / "two-X-ac"), losses(runs / "two-X"))


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_activation_checkpointing_under_fsdp_gives_the_same_gradients(runs, arch):
    from safetensors.torch import load_file

    plain = load_file(str(runs / f"grads-{arch}-False.grads.safetensors"))
    recomputed = load_file(str(runs / f"grads-{arch}-True.grads.safetensors"))
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    worst = max((plain[n] - recomputed[n]).abs().max().item() for n in plain)
    assert worst <= 1e-6, f"largest gradient difference under FSDP with activation checkpointing: {worst}"
    if arch != "D":
        assert any(plain[n].abs().sum() > 0 for n in plain if n.startswith("xattn."))


def test_tied_embeddings_from_a_bf16_checkpoint_train_sharded(runs):
    """A bf16 checkpoint with tied embeddings (they stay in the root unit with the fp32 projector): trainable
    weights become fp32 master weights, and the exported model keeps the embeddings tied."""
    import nvlm

    out = runs / "two-tied-bf16"
    assert result(out)["steps"] == 2 and all(torch.isfinite(torch.tensor(losses(out))))
    model = nvlm.from_pretrained(out / "final")
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight


def test_stage1_frozen_weights_unchanged_under_fsdp(runs, backbones, dataset):
    import nvlm

    out = runs / "two-H-pretrain"
    r = result(out)
    assert r["steps"] == 3 and r["optimizer_params"] == r["trainable_params"]
    fresh = build_model(RunConfig.from_dict(cfg_dict(backbones, dataset, "H", stage="pretrain")))[0].state_dict()
    trained = nvlm.from_pretrained(out / "final").state_dict()
    for k, v in fresh.items():
        if k.startswith(("llm.", "vision.")):
            assert torch.equal(trained[k], v), k
    changed = [k for k in fresh if k.startswith(("projector.", "xattn.")) and not torch.equal(trained[k], fresh[k])]
    assert any(k.startswith("projector.") for k in changed) and any(k.startswith("xattn.") for k in changed)


def test_resume_on_two_processes_is_exact_and_on_one_is_correct(runs, backbones, dataset):
    straight, stopped = losses(runs / "straight"), losses(runs / "stopped")
    assert result(runs / "stopped")["steps"] == 6
    assert len(straight) == 6 and straight == stopped  # bit-identical after a stop on one process
    # the 2-process checkpoint of step 3, resumed on 1 process: same weights, same next samples
    one = runs / "one-proc-resume"
    assert [p.name for p in complete_checkpoints(one / "checkpoints")][-1] == "step_0000003"
    Trainer(RunConfig.from_dict(cfg_dict(backbones, dataset, "X", steps=6, save_every=3)), one, log=quiet).run()
    resumed = losses(one)
    assert close(resumed[3:], straight[3:]), (resumed, straight)


def test_mixed_step_text_only_and_images_completes(runs):
    r0, r1 = result(runs / "mixed", 0), result(runs / "mixed", 1)
    assert "error" not in r0 and "error" not in r1
    assert r0["loss"] == r1["loss"] and torch.isfinite(torch.tensor(r0["loss"])) and r0["tokens"] == r1["tokens"]
    assert r0["norm"] > 0 and r0["mixed"] == 1


def test_a_data_error_on_one_process_stops_every_process(runs):
    errors = [result(runs / "broken", k).get("error", "") for k in (0, 1)]
    assert all(errors), errors
    assert any("TooManyBadSamples" in e and "broken.png" in e for e in errors), errors
    assert all("TooManyBadSamples" in e or "PeerFailed" in e for e in errors), errors


def test_torchrun_cli_two_processes(backbones, dataset, tmp_path):
    """The user's command: `torchrun --nproc_per_node=2 -m nvlm train CONFIG --out DIR`; one summary line
    (process 0), a DCP checkpoint with each process's RNG, and the exported model."""
    import subprocess
    import sys

    import yaml

    cfg = cfg_dict(backbones, dataset, "D", steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "nvlm",
        "train",
        str(tmp_path / "run.yaml"),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished at step 2") == 1, proc.stdout
    step = tmp_path / "out" / "checkpoints" / "step_0000002"
    assert (step / "COMPLETE").is_file() and len(list(step.glob("rng_rank*.pt"))) == 2
    assert (tmp_path / "out" / "final" / "config.json").is_file()
