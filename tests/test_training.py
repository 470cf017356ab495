"""Training faults and invariants: exact resume, torn saves, SIGTERM, NaN steps, bad images, stage handover.

python -m pytest tests/test_training.py -q
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest
import torch
from conftest import write_color_dataset

from nvlm.distributed.dcp import complete_checkpoints
from nvlm.training.config import RunConfig
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import NonFiniteLoss, Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 image samples (colors), 10 text-only, and one truncated image, as LLaVA / OpenAI JSONL."""
    return write_color_dataset(tmp_path_factory.mktemp("data"), 30, 10)


def make_cfg(backbones, dataset, arch="D", stage="sft", steps=6, **train) -> RunConfig:
    sources = [{"path": str(dataset / "images.jsonl"), "weight": 3}, {"path": str(dataset / "text.jsonl")}]
    if train.pop("broken", False):
        sources.append({"path": str(dataset / "broken.jsonl"), "weight": 1})
    return RunConfig.from_dict(
        {
            "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": sources, "max_seq_len": 256, "pack": train.pop("pack", False)},
            "train": {
                "stage": stage,
                "max_steps": steps,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 2,
                **train,
            },
        }
    )


def losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def quiet(*args, **kwargs):
    pass


@pytest.mark.parametrize("arch", ["D", "H"])
def test_resume_is_exact(backbones, dataset, tmp_path, arch):
    cfg = make_cfg(backbones, dataset, arch, steps=20)
    Trainer(cfg, tmp_path / "straight", log=quiet).run()
    first = Trainer(cfg, tmp_path / "stopped", log=quiet)
    original = first.train_step

    def stop_after_10(batches):
        out = original(batches)
        if first.step == 9:  # this is the 10th step: ask to stop like SIGTERM would
            first._stop = True
        return out

    first.train_step = stop_after_10
    result = first.run()
    assert result.interrupted and result.steps == 10
    resumed = Trainer(cfg, tmp_path / "stopped", log=quiet)
    assert resumed.run().steps == 20
    straight, stopped = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert len(straight) == len(stopped) == 20
    assert straight == stopped  # bit-identical per-step losses on CPU


def test_torn_checkpoint_is_never_loaded(backbones, dataset, tmp_path, monkeypatch):
    cfg = make_cfg(backbones, dataset, steps=4, save_every=2)
    Trainer(cfg, tmp_path, log=quiet).run()
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_0000002", "step_0000004"]
    # a save killed half-way: the .tmp folder and an unmarked folder must be ignored
    (ckpts / "step_0000006.tmp").mkdir()
    (ckpts / "step_0000008").mkdir()
    (ckpts / "step_0000008" / "trainer_state.json").write_bytes(b"garbage")
    # and a save that dies between files: the weights are written, then the disk is full
    import nvlm.distributed.dcp as state

    real_save = state.dcp.save

    def boom(*a, **k):
        real_save(*a, **k)
        raise OSError("disk full")

    real_async_save = state.dcp.async_save

    def boom_async(*a, **k):  # train.async_checkpoint: the background write fails the same way
        done, failed = real_async_save(*a, **k), Future()
        done.add_done_callback(lambda _: failed.set_exception(OSError("disk full")))
        return failed

    monkeypatch.setattr(state.dcp, "save", boom)
    monkeypatch.setattr(state.dcp, "async_save", boom_async)
    trainer = Trainer(make_cfg(backbones, dataset, steps=6, save_every=2), tmp_path, log=quiet)
    with pytest.raises(OSError, match="disk full"):
        trainer.run()
    monkeypatch.undo()
    assert complete_checkpoints(ckpts)[-1].name == "step_0000004"
    resumed = Trainer(make_cfg(backbones, dataset, steps=6, save_every=2), tmp_path, log=quiet)
    resumed.resume()
    assert resumed.step == 4


def test_nonfinite_loss_skips_step_and_stops_after_n(backbones, dataset, tmp_path):
    trainer = Trainer(make_cfg(backbones, dataset, steps=8, max_nonfinite_in_row=3), tmp_path, log=quiet)
    original = trainer.train_step
    snapshots = {}

    def poisoned(batches):
        if trainer.step == 2:
            snapshots["before"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            loss, norm, tokens = original(batches)
            return float("nan"), norm, tokens
        if trainer.step == 3:
            snapshots["after"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        if trainer.step >= 5:
            return float("inf"), float("nan"), 1
        return original(batches)

    trainer.train_step = poisoned
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        trainer.run()
    assert trainer.skipped == 4
    assert all(torch.equal(v, snapshots["after"][k]) for k, v in snapshots["before"].items())


def test_corrupt_image_is_skipped_and_counted(backbones, dataset, tmp_path):
    from nvlm.data.blend import TooManyBadSamples

    result = Trainer(make_cfg(backbones, dataset, steps=6, broken=True), tmp_path / "a", log=quiet).run()
    assert result.counts["bad_sample"] >= 1 and result.steps == 6
    cfg = make_cfg(backbones, dataset, steps=6, broken=True)
    cfg.data.max_bad_in_row = 0
    with pytest.raises(TooManyBadSamples, match="broken.png"):
        Trainer(cfg, tmp_path / "b", log=quiet).run()


def test_read_ahead_thread_changes_nothing(backbones, dataset, tmp_path):
    """Batches read ahead in a thread (data.prefetch), with or without data worker processes (data.workers),
    give the same losses, counts and checkpointed data position as reading in the step: the checkpoint records
    the last batch trained on, not read."""
    results = {}
    for depth, workers in ((0, 0), (3, 0), (1, 2)):  # (1, 2): the thread drives 2 data worker processes
        cfg = make_cfg(backbones, dataset, steps=5, broken=True)
        cfg.data.prefetch, cfg.data.workers = depth, workers
        out = tmp_path / f"{depth}-{workers}"
        r = Trainer(cfg, out, log=quiet).run()
        state = json.loads((out / "checkpoints/step_0000005/trainer_state.json").read_text())
        results[depth, workers] = (losses(out), r.counts, state["ranks"])
    assert results[0, 0] == results[3, 0] == results[1, 2]
    assert results[0, 0][1]["used"] == 5 * 4


def test_stage1_checkpoint_hands_over_to_stage2(backbones, dataset, tmp_path):
    r1 = Trainer(make_cfg(backbones, dataset, "H", stage="pretrain", steps=3), tmp_path / "s1", log=quiet).run()
    assert r1.final_dir is not None and (r1.final_dir / "config.json").is_file()
    cfg2 = make_cfg(backbones, dataset, "H", stage="sft", steps=2)
    cfg2.model.init_from = str(r1.final_dir)
    t2 = Trainer(cfg2, tmp_path / "s2", log=quiet)
    import nvlm

    stage1, stage1_proc = nvlm.load(r1.final_dir)
    for name, p in stage1.state_dict().items():
        assert torch.equal(p, t2.model.state_dict()[name]), name
    assert any(p.requires_grad for p in t2.model.llm.parameters())
    t2.run()
    assert (tmp_path / "s2" / "final" / "model.safetensors").is_file() and (tmp_path / "s2" / "loss.png").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(backbones, dataset, tmp_path):
    cfg = make_cfg(backbones, dataset, steps=400)
    cfg.save(tmp_path / "run.json")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvlm", "train", str(tmp_path / "run.json"), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output
    assert "saved and stopped" in output
    step = complete_checkpoints(out / "checkpoints")[-1].name
    assert 3 <= int(step.split("_")[1]) < 400


def test_yaml_config_overrides_and_cli_errors(backbones, dataset, tmp_path, capsys):
    import yaml

    from nvlm.cli import main
    from nvlm.config import ConfigError
    from nvlm.training.config import load_run_config, override

    cfg = make_cfg(backbones, dataset, steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    loaded = load_run_config(tmp_path / "run.yaml")
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(json.dumps(cfg.to_dict()))
    changed = override(loaded, ["train.max_steps=3", "train.betas=[0.9, 0.95]", "model.overrides.tags.style=none"])
    assert changed.train.max_steps == 3 and changed.model.overrides["tags"]["style"] == "none"
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        override(loaded, ["train.max_step=3"])
    bad = cfg.to_dict()
    bad["train"]["learning_rate"] = 1.0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(bad))))
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "no-such-recipe", "--out", str(tmp_path / "o")]) == 2
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "ok"), "train.max_steps=2"]) == 0
    out = tmp_path / "ok"
    assert json.loads((out / "run_config.json").read_text())["train"]["max_steps"] == 2
    assert list((out / "tb").glob("events.out.tfevents.*")), "TensorBoard events written"
    assert (out / "checkpoints" / "step_0000002" / "run_config.json").is_file()
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(read_metrics(out / "metrics.jsonl")[0])


def test_activation_checkpointing_gives_the_same_losses(backbones, dataset, tmp_path):
    plain = Trainer(make_cfg(backbones, dataset, steps=3), tmp_path / "a", log=quiet)
    plain.run()
    ckpt = Trainer(make_cfg(backbones, dataset, steps=3, activation_checkpointing=True), tmp_path / "b", log=quiet)
    ckpt.run()
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "a")), torch.tensor(losses(tmp_path / "b")), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_bf16_backbone_checkpoint_trains_with_fp32_master_weights(backbones, dataset, tmp_path, stage):
    """Real checkpoints are bf16: the trainer keeps what trains in fp32, the frozen rest in bf16, and the
    fp32 x-attn blocks sit between bf16 LLM layers (stage 1) without a dtype clash."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = tmp_path / "llm-bf16"
    AutoModelForCausalLM.from_pretrained(backbones["qwen2"]).to(torch.bfloat16).save_pretrained(llm)
    AutoTokenizer.from_pretrained(backbones["qwen2"]).save_pretrained(llm)
    cfg = make_cfg(backbones, dataset, "H", stage=stage, steps=2)
    cfg.model.llm = str(llm)
    trainer = Trainer(cfg, tmp_path / "run", log=quiet)
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.llm.parameters()}
    assert dtypes == ({(False, torch.bfloat16)} if stage == "pretrain" else {(True, torch.float32)})
    assert all(p.dtype == torch.float32 for p in trainer.model.xattn.parameters())
    trainer.run()
    assert all(math.isfinite(x) for x in losses(tmp_path / "run")) and len(losses(tmp_path / "run")) == 2
