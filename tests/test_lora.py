"""LoRA fine-tuning through PEFT: what trains, the PEFT-format adapter, merge, resume, dry-run counts.

python -m pytest tests/test_lora.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_color_dataset
from test_training import losses, make_cfg, quiet

import nvlm
from nvlm.models.lora import is_adapter_param
from nvlm.training.config import ConfigError, RunConfig, override
from nvlm.training.trainer import Trainer

LORA = {"r": 4, "alpha": 8.0, "targets": "attn,mlp"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("lora_data"), 12, 4)


def lora_cfg(backbones, dataset, arch="H", steps=3, **train) -> RunConfig:
    cfg = make_cfg(backbones, dataset, arch, steps=steps, lora=dict(LORA), **train)
    cfg.model.overrides = {"tags.mode": "special"}
    return cfg


@pytest.fixture(scope="module")
def trained(backbones, dataset, tmp_path_factory):
    """An NVLM-H run with LoRA in special-token tag mode: (the weights before, the trainer after 3 steps)."""
    out = tmp_path_factory.mktemp("lora_run")
    t = Trainer(lora_cfg(backbones, dataset), out, log=quiet)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    return before, t, out


def test_only_adapters_projector_xattn_and_tag_rows_train(trained):
    before, t, _ = trained
    model = t.model
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    base = [k for k in before if k.startswith("llm.") and not is_adapter_param(k)]
    assert base and not changed & set(base), "the LoRA base weights must stay bit-identical"
    assert any(".lora_B." in k for k in changed) and any(k.startswith("projector.") for k in changed)
    assert any(k.startswith("xattn.") for k in changed)
    assert all(k.startswith(("llm.", "projector.", "xattn.")) for k in changed), sorted(changed)[:5]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    delta = [n for n in trainable if "trainable_tokens_delta" in n]
    assert len(delta) == 1 and not any(n.startswith("vision.") for n in trainable)
    rows = model.llm.get_input_embeddings().token_adapter.token_indices["default"]
    tags = t.processor.tokenizer.convert_tokens_to_ids(["<tile_1>", "<tile_global_thumbnail>", "<Image>"])
    assert set(tags) <= set(rows) and len(rows) < 20  # the tag rows, nothing else of the table


def _logits(model, processor, seed=0):
    batch = processor(["<image>\nWhat color is it?"], [[_picture()]])
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(**batch).logits


def _picture():
    from conftest import picture

    return picture(64, 48)


def test_adapter_checkpoint_loads_merges_and_opens_in_peft(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, t, out = trained
    final = out / "final"
    assert (final / "llm_adapter" / "adapter_config.json").is_file()
    assert (final / "llm_adapter" / "adapter_model.safetensors").is_file()
    loaded, loaded_proc = nvlm.load(final)  # adapters applied at load time
    ref = _logits(t.model, t.processor)
    assert torch.allclose(_logits(loaded, loaded_proc), ref, atol=1e-6)
    # PEFT opens our adapter on the plain HF LLM (x-attn wrappers' names mapped back) and agrees with ours
    ids = loaded_proc.tokenizer(["the sky is <tile_1> blue"], return_tensors="pt")["input_ids"]
    peft_llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "llm"), final / "llm_adapter")
    with torch.no_grad():
        loaded.gate_off = True  # text only: the LLM alone
        ours = loaded.llm(input_ids=ids).logits
        theirs = peft_llm.eval()(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # generation in bf16 and nvlm chat load the adapter checkpoint as it is
    from nvlm.cli import main

    bf16, bf16_proc = nvlm.load(final, dtype=torch.bfloat16)
    assert isinstance(bf16.chat(bf16_proc, "What color?", image=_picture(), max_new_tokens=3), str)
    assert main(["chat", "--model", str(final), "--max-new-tokens", "2", "Hi"]) == 0
    from nvlm.serve.engine import Engine, SamplingParams  # what nvlm serve runs over the same from_pretrained

    engine = Engine(loaded, loaded_proc).start()
    try:
        loaded.gate_off = False
        want = loaded.generate(loaded_proc, "<image>\nWhat color?", [_picture()], max_new_tokens=4)
        assert engine.submit("<image>\nWhat color?", [_picture()], SamplingParams(max_tokens=4)).result() == want
    finally:
        engine.close()
    # nvlm merge: a plain checkpoint with the same logits

    assert main(["merge", str(final), str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "llm_adapter").exists()
    merged, merged_proc = nvlm.load(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(_logits(merged, merged_proc), ref, atol=1e-5)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="train.lora.r"):
        override(RunConfig(), ["train.lora.r=-2"])
    with pytest.raises(ConfigError, match="stage 2"):
        override(RunConfig(), ["train.lora.r=8", "train.stage=pretrain"])
    with pytest.raises(ConfigError, match="train.lora.dropout"):
        override(RunConfig(), ["train.lora.dropout=2"])


def test_unknown_target_is_a_clear_error(backbones, dataset, tmp_path):
    cfg = lora_cfg(backbones, dataset)
    cfg.train.lora.targets = "attn,bogus"
    with pytest.raises(ValueError, match="'bogus' matches no linear layer"):
        Trainer(cfg, tmp_path, log=quiet)


@pytest.mark.slow
def test_resume_after_sigterm_is_exact(backbones, dataset, tmp_path):
    """`nvlm train` with LoRA, SIGTERM mid-run (it saves a DCP checkpoint), run again: the same losses and
    weights as a run never stopped."""
    cfg = lora_cfg(backbones, dataset, "X", steps=10)
    cfg.save(tmp_path / "run.json")
    straight = Trainer(cfg, tmp_path / "straight", log=quiet)
    straight.run()
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "nvlm", "train", str(tmp_path / "run.json"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and losses(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0 and "saved and stopped" in output, output
    from nvlm.distributed.dcp import complete_checkpoints

    assert int(complete_checkpoints(out / "checkpoints")[-1].name.split("_")[1]) < 10
    resumed = Trainer(cfg, out, log=quiet)
    assert resumed.run().steps == 10
    assert losses(tmp_path / "straight") == losses(out)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_counts_equal_the_real_model(backbones, dataset):
    from nvlm.training.build import build_model
    from nvlm.training.plan import plan
    from nvlm.training.stages import apply_stage

    cfg = lora_cfg(backbones, dataset, "H")
    real, real_proc = build_model(cfg)
    apply_stage(real, "sft")
    report = plan(cfg, 2)
    assert report["params_trainable"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert report["params_total"] == sum(p.numel() for p in real.parameters())
    full = plan(make_cfg(backbones, dataset, "H"), 2)
    lora, llm = report["components"]["llm"], full["components"]["llm"]
    assert 0 < lora["trainable"] < llm["trainable"] / 10 and lora["frozen"] >= llm["trainable"]
    assert report["memory_gib"]["optimizer"] < full["memory_gib"]["optimizer"]


def test_stage1_hands_over_to_lora_stage2_and_an_adapter_checkpoint_is_refused(backbones, dataset, tmp_path):
    s1 = make_cfg(backbones, dataset, "H", stage="pretrain", steps=1)
    s1.model.overrides = {"tags.mode": "special"}
    r1 = Trainer(s1, tmp_path / "s1", log=quiet).run()
    cfg = lora_cfg(backbones, dataset, "H", steps=1)
    cfg.model.init_from = str(r1.final_dir)
    t2 = Trainer(cfg, tmp_path / "s2", log=quiet)
    stage1 = nvlm.from_pretrained(r1.final_dir).state_dict()
    mine = t2.model.state_dict()
    for k, v in stage1.items():  # stage 1's weights, under the base-layer names LoRA gives them
        key = (
            k
            if k in mine
            else k.replace("_proj.", "_proj.base_layer.").replace(
                "embed_tokens.", "embed_tokens.token_adapter.base_layer."
            )
        )
        assert torch.equal(mine[key], v), k
    r2 = t2.run()
    again = lora_cfg(backbones, dataset, "H", steps=1)
    again.model.init_from = str(r2.final_dir)
    with pytest.raises(ValueError, match="nvlm merge"):
        Trainer(again, tmp_path / "s3", log=quiet)


def test_vision_tower_adapters_with_dora_and_rslora_save_load_and_merge(build_model, tmp_path):
    from nvlm.models.lora import apply_lora
    from nvlm.training.config import LoraSpec
    from nvlm.training.stages import apply_stage

    model, processor = build_model("D")
    apply_lora(
        model, LoraSpec(r=2, alpha=4.0, targets="q_proj,mlp", dora=True, rslora=True, vision=True), processor.tokenizer
    )
    apply_stage(model, "sft")
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("vision.") and ".lora_A." in n for n in trains)
    assert any("lora_magnitude_vector" in n for n in trains)
    assert all(is_adapter_param(n) or n.startswith("projector.") for n in trains)
    with torch.no_grad():  # adapters that do something (PEFT starts B at zero)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    model.save_pretrained(str(tmp_path / "ckpt"))
    processor.save_pretrained(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "vision_adapter" / "adapter_config.json").is_file()
    ref = _logits(model, processor)
    assert torch.allclose(_logits(*nvlm.load(tmp_path / "ckpt")), ref, atol=1e-6)
    from nvlm.loading import merge_checkpoint

    merge_checkpoint(tmp_path / "ckpt", tmp_path / "merged")
    assert torch.allclose(_logits(*nvlm.load(tmp_path / "merged")), ref, atol=1e-5)
