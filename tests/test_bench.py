"""``nvlm bench train`` (paper Table 3 at our scale) and its analytic FLOP counter.

python -m pytest tests/test_bench.py -q
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nvlm.bench.cli import add_bench_subcommands
from nvlm.bench.train import Shape, build_models, make_batch, synthetic_image
from nvlm.training.flops import train_flops

# A smaller cousin of the cpu preset: 16 tokens per 112 px tile, 6+1 tiles, x-attn before every 2nd layer.
TINY = Shape(
    llm=dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        tie_word_embeddings=False,
    ),
    vision=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=[112, 112],
        patch_size=[14, 14],
        norm_type="rms_norm",
        use_qk_norm=True,
        use_mean_pooling=True,
    ),
    text_tokens=24,
    batch_size=2,
    xattn_every=2,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread here (two OpenMP threads spin-wait for each other when other jobs share the two
    cores, which made these tests 10× slower), and the session's own count back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="nvlm bench")
    add_bench_subcommands(parser)
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("arch,stage", [("D", "sft"), ("X", "sft"), ("H", "sft"), ("X", "pretrain")])
def test_analytic_flops_match_flop_counter(arch, stage):
    models, processors = build_models([arch], TINY, stage)
    model = models[arch]
    batch, tokens = make_batch(processors[arch], TINY, synthetic_image(TINY.tiles, model.vision.tile_size))
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for CPU's fused attention kernel
    # (aten::_scaled_dot_product_flash_attention_for_cpu) and would count it as 0 FLOPs; the math backend runs
    # attention as bmm/matmul, which it does count (2 forward, 4 backward: exactly the analytic 3×). All else
    # it counts (mm/addmm/bmm/convolution, the patch Conv2d included) is in the analytic model; what it does
    # not count (norms, softmax, the embedding gather, the loss, AdamW) is not matmul work and not in the
    # analytic count either. The one matmul the analytic count leaves out is the rotary-angle outer product
    # (hd/2 × T per forward, far below 0.1%).
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(**batch).loss.backward()
    measured = counter.get_total_flops() / TINY.batch_size
    analytic = train_flops(model, tokens, stage)
    assert analytic["total"] == pytest.approx(measured, rel=0.05)
    # the vision tower ran forward only, and the count says so: its FLOPs are all in the forward pass
    per_module = counter.get_flop_counts()
    vision = sum(per_module["NVLM.vision"].values()) / TINY.batch_size
    assert vision == pytest.approx(analytic["vision"], rel=0.05)


def test_bench_train_runs_all_three_archs(capsys):
    # the cpu preset's backbones with a shorter sample (2+1 tiles, 16 text tokens) to keep the test quick
    code = _bench(
        "train",
        "--arch",
        "D,X,H",
        "--preset",
        "cpu",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "1",
        "--tiles",
        "2",
        "--text-tokens",
        "16",
        "--threads",
        "1",
        "--json",
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    archs = result["archs"]
    assert set(archs) == {"D", "X", "H"}
    for r in archs.values():
        assert r["samples_per_s"] > 0 and len(r["step_s_all"]) == 2
        assert r["tflop_per_sample"] > 0 and r["mfu"] is None and r["peak_mem_gib"] is None
        assert r["peak_reserved_gib"] is None  # CPU: no CUDA allocator
        assert r["tiles"] == 3
    # the point of Table 3: X and H shorten the decoder sequence (X most), D has no x-attn memory
    assert archs["X"]["decoder_tokens"] < archs["H"]["decoder_tokens"] < archs["D"]["decoder_tokens"]
    assert archs["D"]["memory_tokens"] == 0
    assert archs["X"]["memory_tokens"] > 0 and archs["H"]["memory_tokens"] > 0
    for arch, paper in (("X", 1.76), ("H", 1.26)):
        ratio = result["ratios"][f"{arch}/D"]
        assert ratio["measured"] == pytest.approx(archs[arch]["samples_per_s"] / archs["D"]["samples_per_s"])
        assert ratio["flops_predicted"] == pytest.approx(
            archs["D"]["tflop_per_sample"] / archs[arch]["tflop_per_sample"]
        )
        assert ratio["paper"] == paper
        assert ratio["flops_predicted"] > 1  # fewer decoder tokens → fewer FLOPs per sample


def test_bench_table_output(capsys):
    code = _bench(
        "train",
        "--arch",
        "d,x",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "1",
        "--text-tokens",
        "8",
        "--tiles",
        "1",
        "--device",
        "cpu",
        "--park",
        "--threads",
        "1",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "X/D" in out and "1.76" in out and "n/a" in out


@pytest.mark.parametrize("value", ["D,Q", "", "D,D", "all"])
def test_bad_arch_is_a_clear_error(capsys, value):
    assert _bench("train", "--arch", value) == 2
    err = capsys.readouterr().err
    assert "--arch" in err and "D, X, H" in err


def test_synthetic_image_tiles_to_the_requested_grid():
    from nvlm.vision.tiling import plan_tiles

    for tiles in (1, 2, 4, 6, 9):
        image = synthetic_image(tiles, 56)
        plan = plan_tiles(image.width, image.height, 56, 1, tiles)
        assert plan.num_regular == tiles and plan.thumbnail == (tiles > 1)


def test_dry_run_counts_gpu_shapes_without_weights(capsys):
    # the gpu-1b proxy (~1.5B LLM + 300M ViT) on the meta device: tokens and FLOPs, no memory, no timing
    assert _bench("train", "--preset", "gpu-1b", "--dry-run", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    archs = result["archs"]
    assert archs["D"]["decoder_tokens"] > 7 * 256 and archs["X"]["memory_tokens"] == 7 * 256
    assert all(r["samples_per_s"] is None for r in archs.values())
    # at 34B shapes, FLOPs alone predict X ≈ 2.0–2.1× and H ≈ 1.7–1.8× D's sample rate
    assert 1.7 < result["ratios"]["X/D"]["flops_predicted"] < 2.3
    assert 1.4 < result["ratios"]["H/D"]["flops_predicted"] < 1.9


def test_vs_hf_train_and_generate_run_on_tiny_shapes():
    """Smoke test of ``nvlm bench train|generate --vs hf`` (no timing assertions): D is InternVL with our
    weights (logits bitwise equal, same greedy tokens), X runs against Mllama."""
    from dataclasses import replace

    from nvlm.bench import vs_hf

    shape = replace(TINY, steps=1, warmup=0, batch_size=1)
    train = vs_hf.bench_train(["D", "X"], shape)
    assert [(r["arch"], r["reference"]) for r in train["rows"]] == [("D", "InternVL"), ("X", "Mllama")]
    assert train["rows"][0]["max_abs_logit_diff"] == 0.0
    assert all(r["ratio"] > 0 for r in train["rows"])
    gen = vs_hf.bench_generate(["D", "X"], shape, [1, 2], new_tokens=3)
    assert [(r["arch"], r["batch_size"]) for r in gen["rows"]] == [("D", 1), ("D", 2), ("X", 1), ("X", 2)]
    assert all(r["same_tokens"] for r in gen["rows"] if r["arch"] == "D")
    assert "NVLM-X  Mllama" in vs_hf.render(train) and "tokens/s" in vs_hf.render(gen)


def test_vs_hf_train_compiles_ours_and_the_reference(monkeypatch):
    """``--compile both``: every decoder layer, vision layer and projector of both models is compiled, and the
    first (compiling) step is reported apart from the timed rounds."""
    from dataclasses import replace

    from nvlm.bench import hf_refs, vs_hf
    from nvlm.distributed.parallel import compile_targets

    monkeypatch.setenv("NVLM_COMPILE_BACKEND", "aot_eager")  # no C compiler needed, seconds
    built = []
    monkeypatch.setattr(vs_hf, "build_pair", lambda *a: built.append(hf_refs.build_pair(*a)) or built[-1])
    train = vs_hf.bench_train(["D"], replace(TINY, steps=1, warmup=0, batch_size=1), compile="both")
    (row,) = train["rows"]
    assert row["ours_first_step_s"] > 0 and row["hf_first_step_s"] > 0 and row["ratio"] > 0
    pair = built[0]
    theirs = hf_refs.reference_compile_targets(pair.hf)
    assert pair.hf.model.multi_modal_projector in theirs and len(theirs) > len(pair.hf.model.language_model.layers) + 1
    for m in [*compile_targets(pair.ours), *theirs]:
        assert hasattr(m.forward, "_torchdynamo_orig_callable")
    assert "both torch.compile'd" in vs_hf.render(train) and "first step (compiling)" in vs_hf.render(train)


def test_vs_hf_flags_are_checked(capsys):
    assert _bench("generate", "--arch", "D") == 2  # no --vs hf
    assert _bench("generate", "--vs", "hf", "--arch", "H") == 2
    assert _bench("train", "--vs", "hf", "--arch", "D,H") == 2
    assert "--arch D,X" in capsys.readouterr().err
    assert _bench("train", "--compile", "ours") == 2  # compile is a --vs hf comparison
    assert "add --vs hf" in capsys.readouterr().err


def test_bench_packing_runs_and_packing_keeps_the_loss(capsys):
    """Smoke test of ``nvlm bench packing`` (no timing assertions)."""
    assert _bench("packing", "--samples", "4", "--max-len", "96", "--rounds", "1", "--warmup", "0", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 4 and result["loss_rel_diff"] < 1e-5 and result["ratio"] > 0


def test_race_ratio_is_the_median_of_each_rounds_own_ratio(monkeypatch):
    """A slow spell of the machine slows both calls of a round; the per-round ratio cancels it, a ratio of the
    two medians would not."""
    from nvlm.bench import vs_hf

    clock = [0.0]
    monkeypatch.setattr(vs_hf.time, "perf_counter", lambda: clock[0])
    slow = iter([1, 1, 5, 5, 5, 5, 1, 1] * 2)  # the machine's speed factor, one value per call, in call order

    def call(cost: float):
        def run():
            clock[0] += cost * next(slow)

        return run

    race = vs_hf._interleaved(call(1.0), call(1.5), rounds=8, warmup=0)  # theirs costs 1.5× ours
    assert race.ratio == pytest.approx(1.5) and race.spread == pytest.approx((1.5, 1.5))
    assert race.ours == pytest.approx(3.0) and race.theirs == pytest.approx(4.5)  # medians across the spell
