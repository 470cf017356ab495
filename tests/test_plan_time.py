"""The planner's time model (``nvlm.training.plan_time``) and the memory plan under tensor parallelism, on a
tiny config planned on the meta device; the paper-scale figures are in tests/test_plan.py.

python -m pytest tests/test_plan_time.py -q
"""

from __future__ import annotations

import dataclasses

import pytest

from nvlm.training import plan_time
from nvlm.training.config import DataSpec, ModelSpec, RunConfig, TrainConfig
from nvlm.training.plan import memory, meta_model, plan
from nvlm.training.plan_time import Hardware, collective_s, estimate

D, F, L, HEADS, KV_HEADS, HEAD_DIM, SEQ = 256, 768, 4, 8, 8, 32, 128
LLM = dict(
    model_type="qwen2",
    vocab_size=1024,
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
VISION = dict(
    type="internvl",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=[56, 56],
    patch_size=[14, 14],
    norm_type="rms_norm",
)


def _cfg(tp: int = 1, micro: int = 2, ac: bool = True, gbs: int = 16) -> RunConfig:
    return RunConfig(
        model=ModelSpec(arch="D", llm_config=dict(LLM), vision_config=dict(VISION), overrides={"tiling.max_tiles": 1}),
        data=DataSpec(max_seq_len=SEQ),
        train=TrainConfig(stage="sft", micro_batch_size=micro, global_batch_size=gbs, activation_checkpointing=ac,
                          tp=tp),
    )  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return meta_model(_cfg())


def _estimate(model, world: int, tp: int, hw: Hardware | None = None, micro: int = 2, ac: bool = True) -> dict:
    cfg = _cfg(tp, micro, ac)
    return estimate(model, cfg, world, tp, micro, ac, hw or Hardware(), memory(model, cfg, world // tp, tp, micro, ac))


def test_more_bandwidth_less_communication_time(model):
    # inside a node NVLink; over nodes min(NVLink, ranks per node × IB)
    assert collective_s(1e9, 8, 8, Hardware(nvlink_gbs=900)) < collective_s(1e9, 8, 8, Hardware())
    assert collective_s(1e9, 16, 1, Hardware(ib_gbs=100)) < collective_s(1e9, 16, 1, Hardware())
    assert collective_s(1e9, 16, 8, Hardware()) < collective_s(1e9, 16, 1, Hardware())  # 8 NICs, not 1
    assert collective_s(1e9, 1, 1, Hardware()) == 0.0
    # ring: (n-1)/n of the tensor through the link, at link_efficiency
    assert collective_s(1e9, 4, 8, Hardware()) == pytest.approx(0.75 * 1e9 / (450e9 * 0.8))
    slow, fast = (_estimate(model, 16, 8, Hardware(ib_gbs=b, nvlink_gbs=4 * b)) for b in (5, 50))
    for k in ("fsdp", "tp"):
        assert fast["seconds_per_micro_batch"][k] < slow["seconds_per_micro_batch"][k]
    assert fast["step_s"] < slow["step_s"]
    assert fast["seconds_per_micro_batch"]["compute"] == slow["seconds_per_micro_batch"]["compute"]


def test_communication_bytes_tp1_vs_tp8_by_hand(model):
    one, eight = _estimate(model, 16, 1), _estimate(model, 16, 8)
    assert one["tp_gb_per_gpu_micro_batch"] == 0 and one["seconds_per_micro_batch"]["tp"] == 0
    # TP: per decoder layer and pass (forward, backward, recompute with AC) 2 all-reduces (= 2 reduce-scatters +
    # 2 all-gathers) of micro-batch × seq × hidden bf16, of which a rank moves 7/8
    assert eight["tp_gb_per_gpu_micro_batch"] == pytest.approx(L * 3 * 4 * (2 * SEQ * D * 2) * 7 / 8 / 1e9)
    # FSDP gathers a tp rank's slice: TP splits the decoder layers' Linears (with q/k/v biases); the embeddings
    # and the LM head stay whole on every tp rank, as the runtime keeps them
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    kv = KV_HEADS * HEAD_DIM
    layer = 2 * D * D + 2 * D * kv + 3 * D * F + (D + 2 * kv)
    split = L * layer
    assert vocab * D > 0  # not in `split`
    gathered = one["fsdp_gb_per_gpu_micro_batch"]["gather_fwd"] - eight["fsdp_gb_per_gpu_micro_batch"]["gather_fwd"]
    assert gathered * 1e9 == pytest.approx(2 * split * 7 / 8, rel=1e-4)  # bf16; rel: rounding up per tensor
    # gradients (fp32) of everything that trains; the frozen vision tower has none
    reduced = (
        one["fsdp_gb_per_gpu_micro_batch"]["reduce_scatter"] - eight["fsdp_gb_per_gpu_micro_batch"]["reduce_scatter"]
    )
    assert reduced * 1e9 == pytest.approx(4 * split * 7 / 8, rel=1e-4)


def test_mfu_is_model_flops_over_time_and_peak(model):
    for tp, ac in ((1, True), (2, False)):
        e = _estimate(model, 16, tp, ac=ac)
        assert e["mfu"] == pytest.approx(e["model_pflop_per_step"] * 1e15 / (e["step_s"] * 16 * 989e12))
        assert 0 < e["mfu"] < Hardware().compute_efficiency  # can never beat the kernels' own fraction
    # AC recomputes the forward: more hardware FLOPs for the same model FLOPs
    on, off = _estimate(model, 16, 1, ac=True), _estimate(model, 16, 1, ac=False)
    assert on["model_pflop_per_step"] == off["model_pflop_per_step"]
    assert on["hardware_tflop_per_gpu_micro_batch"] > off["hardware_tflop_per_gpu_micro_batch"]


def test_memory_plan_divides_by_tp(model):
    cfg = _cfg()
    flat, tp2 = memory(model, cfg, 2, 1, 2, True), memory(model, cfg, 1, 2, 2, True)
    # TP-split and FSDP-split weights cost the same per GPU; what TP keeps whole (projector, the LLM's norms,
    # embeddings and LM head, the frozen vision tower) costs 2× under tp 2 × dp 1 what it costs under dp 2
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    whole = sum(p.numel() for p in model.projector.parameters()) + (2 * L + 1) * D + 2 * vocab * D
    assert tp2["shard_trainable"] - flat["shard_trainable"] == pytest.approx(whole / 2, abs=64)
    vision = sum(p.numel() for p in model.vision.parameters())  # frozen, whole on each tp rank: dp 1 holds all
    assert tp2["shard_frozen"] == vision and vision / 2 <= flat["shard_frozen"] < vision
    # a tp rank holds its share of the head- and FFN-sized activations but the norms', the checkpointed layer
    # inputs and the logits whole (no sequence parallelism, no vocabulary-parallel head)
    for ac in (True, False):
        assert flat["acts"][ac]["llm_layers"] / 2 < tp2["acts"][ac]["llm_layers"] < flat["acts"][ac]["llm_layers"]
        assert tp2["acts"][ac]["logits"] == flat["acts"][ac]["logits"]
    assert tp2["acts"][True]["projector"] == flat["acts"][True]["projector"]
    p = plan(_cfg(tp=2), 4)
    assert (p["tp"], p["dp_shard"], p["grad_accum_steps"]) == (2, 2, 4)  # 16 / (2 samples × 2 dp ranks)
    with pytest.raises(ValueError, match="dp_shard"):
        plan(dataclasses.replace(_cfg(), train=dataclasses.replace(_cfg().train, tp=2, dp_shard=3)), 4)


def test_recommended_layout_fits_and_is_the_best(model):
    # the search keeps planned GiB × 1.1 + 2 GiB within the GPU; this tiny model plans at 0.01-0.02 GiB
    free = plan_time.recommend(model, _cfg(), 16, Hardware(), memory)
    hw = Hardware(memory_gib=2.015)  # tight: tp 1 (the unconstrained best here) does not fit
    rows = plan_time.candidates(model, _cfg(), 16, hw, memory)
    assert {r["tp"] for r in rows} == {1, 2, 4, 8} and any(not r["fits"] for r in rows)
    best = plan_time.recommend(model, _cfg(), 16, hw, memory)
    assert free is not None and free["tp"] == 1
    assert best is not None and best["fits"] and best["tp"] > 1
    assert best["gib_per_gpu"] * 1.1 + 2 <= hw.memory_gib
    assert best["mfu"] == pytest.approx(max(r["mfu"] for r in rows if r["fits"]), abs=1e-4)
    # the candidates' memory is the plan's memory for that layout
    p = plan(_cfg(best["tp"], best["micro_batch_size"], best["activation_checkpointing"]), 16, hw)
    assert p["gib_per_gpu"] == pytest.approx(best["gib_per_gpu"])
    assert plan_time.recommend(model, _cfg(), 16, Hardware(memory_gib=2.001), memory) is None


def test_bf16_reduction_and_last_micro_batch_sync_are_modelled():
    """train.reduce_bf16 halves the reduce-scatter bytes; train.sync_last_micro_batch reduce-scatters once per step
    (less traffic, never a slower step) but keeps every trainable unit's whole gradient (more memory)."""
    from nvlm.recipes import get_recipe
    from nvlm.training.plan import plan

    base = get_recipe("x-72b-pretrain")  # stage 1: only the projector and x-attn blocks train
    base.train.micro_batch_size, base.train.activation_checkpointing = 4, True  # 4 micro-batches per step
    plain = plan(base, 128, recommend=False)
    assert plain["grad_accum_steps"] == 4 and plain["time"]["reduce_dtype"] == "fp32"
    bf16 = get_recipe("x-72b-pretrain")
    bf16.train.micro_batch_size, bf16.train.activation_checkpointing, bf16.train.reduce_bf16 = 4, True, True
    half = plan(bf16, 128, recommend=False)
    rs = lambda p: p["time"]["fsdp_gb_per_gpu_micro_batch"]["reduce_scatter"]  # noqa: E731
    assert rs(half) == pytest.approx(rs(plain) / 2) and half["time"]["reduce_dtype"] == "bf16"
    assert half["memory_gib"]["unsharded_grads"] == pytest.approx(plain["memory_gib"]["unsharded_grads"] / 3)
    last = get_recipe("x-72b-pretrain")
    last.train.micro_batch_size, last.train.activation_checkpointing = 4, True
    last.train.sync_last_micro_batch = True
    once = plan(last, 128, recommend=False)
    assert rs(once) == pytest.approx(rs(plain) / 4)
    assert once["time"]["step_s"] <= plain["time"]["step_s"]
    # every trainable unit's whole fp32 gradient, at tp 1
    assert once["memory_gib"]["unsharded_grads"] == pytest.approx(4 * once["params_trainable"] / 1024**3, rel=0.01)
    assert once["memory_gib"]["unsharded_grads"] > plain["memory_gib"]["unsharded_grads"]
