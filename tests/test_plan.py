"""The dry-run planner (``nvlm.training.plan``): counts equal real builds, paper-scale sizes, memory trends.

Tiny recipes are planned from their HF folders and compared with ``nvlm.build`` of the same folders; the
paper recipes (Tables 10–11) are planned from their architecture dicts on the meta device.
"""

from __future__ import annotations

import json

import pytest

import nvlm
from nvlm.recipes import get_recipe
from nvlm.training.config import DataSpec, ModelSpec, RunConfig, TrainConfig
from nvlm.training.plan import plan, render
from nvlm.training.stages import apply_stage, components

TINY = {"tags.mode": "special", "xattn.every": 1}  # the demo's overrides: special tokens → a resized vocab


def _run(stage: str, unfreeze_vision: bool = False, **model: object) -> RunConfig:
    return RunConfig(
        model=ModelSpec(**model),
        data=DataSpec(max_seq_len=64),
        train=TrainConfig(stage=stage, micro_batch_size=2, unfreeze_vision=unfreeze_vision),
    )


def _counts(model) -> dict[str, dict[str, int]]:
    return {
        name: {
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "frozen": sum(p.numel() for p in m.parameters() if not p.requires_grad),
        }
        for name, m in components(model).items()
    }


def _check(p: dict, real) -> None:
    want = _counts(real)
    assert p["components"] == want
    assert p["params_total"] == sum(p_.numel() for p_ in real.parameters())
    assert p["params_trainable"] == sum(p_.numel() for p_ in real.parameters() if p_.requires_grad)
    # the FSDP units partition the model: every parameter in exactly one unit
    assert sum(u["count"] * u["params_each"] for u in p["units"]) == p["params_total"]


@pytest.mark.parametrize(
    "arch,llm,vision", [("D", "qwen2", "internvl"), ("X", "llama", "siglip"), ("H", "qwen2", "clip")]
)
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_counts_equal_real_model(backbones, arch, llm, vision, stage):
    unfreeze = arch == "H" and stage == "sft"  # the demo's setting, once
    cfg = _run(stage, unfreeze, arch=arch, llm=str(backbones[llm]), vision=str(backbones[vision]), overrides=dict(TINY))
    real, real_proc = nvlm.build(arch, llm=str(backbones[llm]), vision=str(backbones[vision]), config=dict(TINY))
    apply_stage(real, stage, unfreeze_vision=unfreeze)
    p = plan(cfg, world_size=2)
    _check(p, real)
    backbone_vocab = json.loads((backbones[llm] / "config.json").read_text())["vocab_size"]
    assert p["shapes"]["vocab"] == len(real_proc.tokenizer) > backbone_vocab  # NVLM's tokens resized the embeddings


def test_counts_from_init_from_checkpoint(build_model, tmp_path):
    real, real_proc = build_model("X", **{"tags__mode": "special", "xattn__every": 2})
    real.save_pretrained(str(tmp_path / "ckpt"))
    real_proc.save_pretrained(str(tmp_path / "ckpt"))
    apply_stage(real, "sft")
    _check(plan(_run("sft", init_from=str(tmp_path / "ckpt")), world_size=3), real)


@pytest.fixture(scope="module")
def d72() -> dict:
    return plan(get_recipe("d-72b-sft"), 128)


def test_paper_sizes(d72):
    # earlier measurement of NVLM-D-72B: 78.86 B = LLM 72.71 B + InternViT-6B 5.54 B + projector 621 M
    c = d72["components"]
    assert d72["params_total"] == pytest.approx(78.86e9, rel=0.01)
    assert c["llm"]["trainable"] == pytest.approx(72.71e9, rel=0.01)
    assert c["vision"]["frozen"] == pytest.approx(5.54e9, rel=0.01) and c["vision"]["trainable"] == 0
    assert c["projector"]["trainable"] == pytest.approx(621e6, rel=0.01)
    assert [u["unit"] for u in d72["units"]] == [
        "llm.layers.*",
        "vision.layers.*",
        "vision",
        "llm.embed_tokens",
        "llm.norm+lm_head",
        "root",
    ]
    assert d72["units"][0]["count"] == 80 and d72["units"][1]["count"] == 45
    x = plan(get_recipe("x-72b-sft"), 128)  # + 10 gated x-attn blocks (every 8th of 80 layers), a 1-layer projector
    assert x["shapes"]["xattn_blocks"] == 10
    assert 8e9 < x["components"]["xattn"]["trainable"] < 10e9
    assert x["params_total"] == pytest.approx(87.1e9, rel=0.01)
    h = plan(get_recipe("h-34b-pretrain"), 128)  # Yi-34B + InternViT-6B + 10 blocks; stage 1: LLM frozen
    assert 44e9 < h["params_total"] < 48e9
    assert h["components"]["llm"]["trainable"] == 0 and h["components"]["llm"]["frozen"] > 34e9
    assert h["params_trainable"] == h["components"]["projector"]["trainable"] + h["components"]["xattn"]["trainable"]


def test_memory_trends(d72):
    cfg = get_recipe("d-72b-sft")
    small, mid = plan(cfg, 8), plan(cfg, 32)
    assert small["gib_per_gpu"] > mid["gib_per_gpu"] > d72["gib_per_gpu"]
    assert small["gib_per_gpu"] > 80  # 72 B trainable parameters do not fit 8 × 80 GB
    # trainable fp32 + frozen (vision) bf16, split 8 ways
    assert small["memory_gib"]["params"] == pytest.approx((73.33e9 * 4 + 5.54e9 * 2) / 8 / 1024**3, rel=0.01)
    for p in (small, d72):  # activation checkpointing lowers activations, and the recipe has it on
        no_ac, ac = (sum(p["activations_gib"][k].values()) for k in ("no_ac", "ac"))
        assert ac < no_ac and p["gib_per_gpu_ac"] < p["gib_per_gpu_no_ac"]
        assert p["gib_per_gpu"] == p["gib_per_gpu_ac"]
    assert d72["gib_per_gpu"] < 80 < d72["gib_per_gpu_no_ac"]


def test_json_and_text(d72):
    data = json.loads(json.dumps(d72))
    for key in (
        "params_total",
        "params_trainable",
        "gib_per_gpu",
        "gib_per_gpu_ac",
        "gib_per_gpu_no_ac",
        "units",
        "memory_gib",
        "components",
    ):
        assert key in data
    assert set(data["memory_gib"]) >= {"params", "grads", "optimizer", "gathered", "activations"}
    text = render(d72)
    assert "llm.layers.*" in text and "AC on" in text and "AC off" in text and "78.86 B" in text


def test_cli_dry_run_json(capsys):
    from nvlm.cli import main

    assert main(["train", "d-72b-sft", "--dry-run", "--json", "--world-size", "128"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["params_total"] - 78.86e9) / 78.86e9 < 0.01
    assert report["world_size"] == 128 and 0 < report["gib_per_gpu"] < report["gib_per_gpu_no_ac"]
    assert main(["train", "tiny-d", "--dry-run", "model.llm=/nonexistent"]) == 2


# ---- time per step, MFU and the recommended layout (nvlm.training.plan_time) ----------------------------------
def _layout(r: dict) -> tuple:
    return r["tp"], r["micro_batch_size"], r["activation_checkpointing"]


@pytest.mark.parametrize("recipe", ["d-72b-sft", "d-72b-pretrain"])
def test_recipe_layout_is_the_recommended_one(recipe, d72):
    p = d72 if recipe == "d-72b-sft" else plan(get_recipe(recipe), 128)
    best, time = p["recommended"], p["time"]
    assert best is not None and best["fits"] and best["gib_per_gpu"] * 1.1 + 2 <= 80
    assert _layout(best) == _layout(time) == (p["tp"], p["micro_batch_size"], p["activation_checkpointing"])
    assert best["dp_shard"] == p["dp_shard"] == 128 // p["tp"]
    assert time["mfu"] >= 0.35 and time["step_s"] > 0  # our bar for the recipes, at the stated hardware
    assert time["gib_per_gpu"] == pytest.approx(p["gib_per_gpu"])
    # the best fitting layout per tp degree: the recommendation is the best of them
    assert set(p["best_by_tp"]) == {1, 2, 4, 8} and p["best_by_tp"][best["tp"]] == best
    assert all(r["mfu"] <= best["mfu"] and r["fits"] for r in p["best_by_tp"].values())


def test_memory_under_tp_at_paper_scale():
    cfg = get_recipe("d-72b-sft")
    cfg.train.tp = 8
    p = plan(cfg, 128, recommend=False)
    assert (p["tp"], p["dp_shard"], p["grad_accum_steps"]) == (8, 16, 8)
    # the LLM's decoder layers (fp32, TP-split) over all 128 GPUs; its embeddings and LM head (replicated across
    # the tp ranks, as the runtime keeps them), the projector (fp32) and the frozen bf16 vision tower whole on
    # each tp rank: over the 16 dp_shard ranks
    llm, proj, vision = p["components"]["llm"]["trainable"], p["components"]["projector"]["trainable"], 5.54e9
    embed_head = 2 * p["shapes"]["vocab"] * p["shapes"]["hidden"]
    want = ((llm - embed_head) * 4 / 128 + (embed_head + proj) * 4 / 16 + vision * 2 / 16) / 1024**3
    assert p["memory_gib"]["params"] == pytest.approx(want, rel=0.01)
    assert p["time"]["tp_gb_per_gpu_micro_batch"] > 0


def test_cli_dry_run_prints_layout_time_and_mfu(capsys):
    from nvlm.cli import main

    assert main(["train", "d-72b-sft", "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "128 GPU(s) as tp 1 × dp_shard 128" in out
    rec = next(line for line in out.splitlines() if line.strip().startswith("recommended"))
    assert "tp 1 × dp_shard 128" in rec and " s, MFU " in rec and "GiB/GPU" in rec
    mfu = float(rec.split("MFU ")[1].split(" %")[0])
    assert 35 <= mfu < 60  # < the assumed 0.6 achievable fraction of peak
    assert "best at tp 8       tp 8 × dp_shard 16" in out
    # a slower network makes the estimate slower: the flags reach the model
    assert main(["train", "d-72b-sft", "--dry-run", "--world-size", "128", "--ib-gbs", "5", "--json"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert slow["hardware"]["ib_gbs"] == 5 and slow["time"]["mfu"] * 100 < mfu
    assert main(["train", "d-72b-sft", "--dry-run", "--compute-efficiency", "1.5"]) == 2  # a fraction of peak
    assert "--compute-efficiency must be > 0 and <= 1" in capsys.readouterr().err
