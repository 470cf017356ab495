"""The optional Perceiver resampler (paper Appendix C, ``nvlm.vision.resampler``): shapes, off = today's model,
cached = uncached generation, save → load, trains in stage 1, a clear refusal by the release export.

python -m pytest tests/test_resampler.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

import nvlm
from nvlm.config import ConfigError, NVLMConfig, apply_overrides
from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids
from nvlm.interop.release import exportable
from nvlm.training.config import DataSpec, ModelSpec, RunConfig, TrainConfig
from nvlm.training.plan import plan
from nvlm.training.stages import apply_stage, components

ON = {"config": {"resampler.latents": 3, "resampler.layers": 2, "resampler.heads": 2}}


def _batch(processor):
    return processor([chat_prompt("Describe.", 1), chat_prompt("Hi", 0)], [[picture(150, 100)], []])


def test_shapes_per_tile(build_model):
    model, processor = build_model("D", **ON)
    assert model.vision.tokens_per_tile == 4 and model.tokens_per_tile == 3  # tiny InternViT: 4 tokens → 3 latents
    tiles = torch.randn(5, 3, model.vision.tile_size, model.vision.tile_size)
    out = model.encode_tiles(tiles)
    assert out.shape == (5, 3, model.dims.hidden_size)
    assert processor.tokens_per_tile == 3
    batch = _batch(processor)
    n_tiles = batch["pixel_values"].shape[0]
    assert int((batch["input_ids"] == processor.pad_id).sum()) == n_tiles * 3  # the image-pad slots


@pytest.mark.parametrize("arch", ["X", "H"])
def test_xattn_memory_holds_latents(build_model, arch):
    model, processor = build_model(arch, **ON)
    batch = _batch(processor)
    tiles = batch["pixel_values"].shape[0]
    decoded = 0 if batch.get("decoder_tiles") is None else batch["decoder_tiles"].numel()
    tags = 0 if batch.get("memory_tag_ids") is None else batch["memory_tag_ids"].numel()
    assert int((batch["memory_index"] >= 0).sum()) == (tiles - decoded) * 3 + tags
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_latents_zero_is_todays_model(build_model, arch):
    plain, plain_proc = build_model(arch)
    off, off_proc = build_model(arch, config={"resampler.latents": 0})
    assert off.resampler is None and "resampler" not in components(off)
    assert not any(k.startswith("resampler.") for k in off.state_dict())
    assert off.tokens_per_tile == off.vision.tokens_per_tile
    set_gates(plain, 0.5)
    set_gates(off, 0.5)
    with torch.no_grad():
        assert torch.equal(plain(**_batch(plain_proc)).logits, off(**_batch(off_proc)).logits)
        tiles = _batch(plain_proc)["pixel_values"]
        assert torch.equal(off.encode_tiles(tiles), off.projector(off.vision(tiles)))  # no resampler on the path


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_resampler_changes_the_image_tokens(build_model, arch):
    on, on_proc = build_model(arch, **ON)
    set_gates(on, 0.5)
    with torch.no_grad():
        logits = on(**_batch(on_proc)).logits
        text_only = on(**on_proc(chat_prompt("Hi", 0), [])).logits
    assert torch.isfinite(logits).all()
    # the text-only row (left-padded in the batch) is the text-only model's: images never leak across samples
    assert torch.allclose(logits[1, -text_only.shape[1] :], text_only[0], atol=1e-5)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_cached_generation_equals_uncached(build_model, arch):
    model, processor = build_model(arch, **ON)
    set_gates(model, 0.5)
    batch = _batch(processor)
    cached = torch.stack(list(generate_ids(model, batch, 10, use_cache=True)), dim=1)
    uncached = torch.stack(list(generate_ids(model, batch, 10, use_cache=False)), dim=1)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ["D", "X"])
def test_save_load_identical_logits(build_model, tmp_path, arch):
    model, processor = build_model(arch, **ON)
    set_gates(model, 0.3)
    with torch.no_grad():
        for p in model.resampler.parameters():
            p.add_(0.01)  # trained (non-initial) weights are what gets saved
        before = model(**_batch(processor)).logits
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_proc = nvlm.load(tmp_path / "ckpt")
    assert loaded.config.resampler.latents == 3 and loaded.tokens_per_tile == 3
    with torch.no_grad():
        assert torch.equal(loaded(**_batch(loaded_proc)).logits, before)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_trains_like_the_projector(build_model, arch, stage):
    model, processor = build_model(arch, **ON)
    set_gates(model, 0.5)  # X/H gates start closed (tanh 0), which would cut the image path's gradient
    apply_stage(model, stage)
    assert all(p.requires_grad for p in model.resampler.parameters())
    if stage == "sft":
        return
    batch = processor(chat_prompt("Describe.", 1) + "a red box", [picture(150, 100)], padding_side="right")
    logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:])
    loss.backward()
    grads = [p.grad for p in model.resampler.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.llm.parameters())  # the LLM stays frozen in stage 1


def test_plan_counts_the_resampler(backbones):
    over = {"tags.mode": "special", "resampler.latents": 3, "resampler.heads": 2}
    paths = {"llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])}
    cfg = RunConfig(
        model=ModelSpec(arch="X", **paths, overrides=dict(over)),
        data=DataSpec(max_seq_len=64),
        train=TrainConfig(stage="pretrain", micro_batch_size=2),
    )
    real, real_proc = nvlm.build("X", **paths, config=dict(over))
    apply_stage(real, "pretrain")
    p = plan(cfg, world_size=2)
    n = sum(x.numel() for x in real.resampler.parameters())
    assert p["components"]["resampler"] == {"trainable": n, "frozen": 0}
    assert p["params_total"] == sum(x.numel() for x in real.parameters())
    assert p["shapes"]["tokens_per_tile"] == 3
    assert p["activations_gib"]["no_ac"]["resampler"] > 0


def test_config_is_validated_and_export_refuses():
    with pytest.raises(ConfigError, match="resampler.latents"):
        apply_overrides(NVLMConfig(), {"resampler.latents": -1})
    with pytest.raises(ConfigError, match="resampler.heads"):
        apply_overrides(NVLMConfig(), {"resampler.heads": 0})
    with pytest.raises(ConfigError, match="unknown"):
        apply_overrides(NVLMConfig(), {"resampler.latent": 4})
    cfg = apply_overrides(NVLMConfig(), {"resampler.latents": 16})
    assert any("Perceiver resampler" in why for why in exportable(cfg, {}))
    assert not any("resampler" in why for why in exportable(NVLMConfig(), {}))


@pytest.mark.parametrize("arch", ["D", "X"])
def test_trainer_stage1_trains_it_and_hands_it_to_stage2(backbones, tmp_path, arch):
    from conftest import write_color_dataset

    from nvlm.training.trainer import Trainer

    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 8, 2)

    def cfg(stage: str, init_from: str | None = None) -> RunConfig:
        return RunConfig.from_dict(
            {
                "model": {
                    "arch": arch,
                    "llm": str(backbones["qwen2"]),
                    "vision": str(backbones["internvl"]),
                    "init_from": init_from,
                    "overrides": {"resampler.latents": 2, "resampler.heads": 2},  # the repro's model override
                },
                "data": {"sources": [{"path": str(data / "images.jsonl")}], "max_seq_len": 256, "pack": False},
                "train": {"stage": stage, "max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-2},
            }
        )

    t1 = Trainer(cfg("pretrain"), tmp_path / "s1", log=lambda *a, **k: None)
    before = {k: v.clone() for k, v in t1.model.state_dict().items()}
    r1 = t1.run()
    after = t1.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("resampler."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("llm."))  # frozen in stage 1
    t2 = Trainer(cfg("sft", str(r1.final_dir)), tmp_path / "s2", log=lambda *a, **k: None)
    assert t2.model.tokens_per_tile == 2
    for k, v in nvlm.from_pretrained(r1.final_dir).state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k
