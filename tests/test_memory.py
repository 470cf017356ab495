"""The inference memory plan (``nvlm serve MODEL --dry-run``) and the check that refuses a load before it starts.

python -m pytest tests/test_memory.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_pair

import nvlm.inference.memory as memory
from nvlm.cli import main
from nvlm.errors import UserError
from nvlm.inference.memory import Serving, plan, serving_model

RELEASE_72B = Path(__file__).parent / "fixtures" / "nvlm-d-72b"  # the release's config.json, no weights


@pytest.fixture(scope="module")
def d72b():
    return serving_model(RELEASE_72B)


def test_the_72b_plan_follows_the_release_config(d72b):
    assert sum(p.numel() for p in d72b.parameters()) == pytest.approx(79.0e9, rel=0.01)
    bf16 = plan(d72b, Serving(tp=1))
    assert bf16["weights_gib"] == pytest.approx(79.0e9 * 2 / 2**30, rel=0.01)
    # GQA: 80 layers × K and V × 8 kv heads × 128 × 2 bytes = 320 KiB a token, 1/tp of it per GPU
    assert bf16["kv_cache_per_token_kib"] == 320
    assert plan(d72b, Serving(tp=8))["kv_cache_per_token_kib"] == 40
    assert bf16["kv_cache_gib"] == pytest.approx(320 * 1024 * 16 * 4096 / 2**30)
    assert bf16["xattn_memory_kv_gib"] == 0  # NVLM-D: image tokens are in the decoder's KV cache


def test_tensor_parallel_splits_the_llm_not_the_vision_tower(d72b):
    from nvlm.training.plan import tp_sharded

    one, four = plan(d72b, Serving(tp=1)), plan(d72b, Serving(tp=4))
    # the decoder layers' projections split 4 ways; embeddings, LM head and norms stay whole on every rank, as the
    # runtime's TP plans leave them
    split = tp_sharded(d72b)
    whole = sum(p.numel() for n, p in d72b.named_parameters() if n.startswith("llm.") and id(p) not in split)
    whole_gib = whole * 2 / 2**30
    assert whole_gib == pytest.approx(2 * 152064 * 8192 * 2 / 2**30, rel=0.01)  # embeddings + LM head, bf16
    assert four["weights_llm_kept_gib"] == pytest.approx(whole_gib + (one["weights_llm_kept_gib"] - whole_gib) / 4)
    assert four["weights_vision_gib"] == one["weights_vision_gib"]
    assert four["weights_projector_gib"] == one["weights_projector_gib"]


def test_quantization_shrinks_the_llm_linears_only(d72b):
    bf16, int8, int4 = (plan(d72b, Serving(quantize=q)) for q in (None, "int8", "int4"))
    assert bf16["weights_llm_quantized_gib"] == 0
    linears = bf16["weights_llm_kept_gib"] - int8["weights_llm_kept_gib"]  # what int8 took out of the bf16 part
    assert int8["weights_llm_quantized_gib"] == pytest.approx(linears / 2, rel=0.01)  # 1 byte against 2
    assert int4["weights_llm_quantized_gib"] == pytest.approx(linears * (0.5 + 4 / 128) / 2, rel=0.01)
    assert int4["weights_vision_gib"] == bf16["weights_vision_gib"]  # the tower is kept in bf16
    # an int4 LLM with a bf16 InternViT: ≈ 51 GiB of weights, one 80 GB GPU
    assert 48 < int4["weights_gib"] < 56


def test_our_format_and_the_release_layout_give_the_same_plan(tmp_path):
    from nvlm.interop.convert import convert
    from nvlm.testing.replica import release_replica

    release = release_replica(tmp_path / "release")
    ours = convert(release, tmp_path / "ours", to="ours")
    a, b = plan(serving_model(release), Serving()), plan(serving_model(ours), Serving())
    assert {k: v for k, v in a.items() if k != "settings"} == {k: v for k, v in b.items() if k != "settings"}


@pytest.mark.parametrize("arch", ["X", "H"])
def test_cross_attention_memory_kv_is_planned(build_model, arch, tmp_path):
    save_pair(build_model(arch), tmp_path / arch)
    p = plan(serving_model(tmp_path / arch), Serving(max_batch=2))
    model, _ = build_model(arch)
    tiles = model.config.tiling.max_tiles + (1 if arch == "X" else 0)  # H decodes the thumbnail
    kv = model.xattn[0].k_proj.out_features * 4  # K and V, fp32 → bf16 planned: 2 bytes each
    assert p["xattn_memory_kv_gib"] * 2**30 == len(model.xattn) * kv * tiles * model.tokens_per_tile * 2


def test_dry_run_prints_the_plan_as_json(capsys):
    code = main(["serve", str(RELEASE_72B), "--dry-run", "--json", "--tp", "2", "--quantize", "int8"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["settings"]["tp"] == 2 and report["settings"]["quantize"] == "int8"
    parts = ("llm_quantized", "llm_kept", "vision", "projector")
    assert report["weights_gib"] == pytest.approx(sum(report[f"weights_{k}_gib"] for k in parts))


def test_a_model_that_cannot_fit_is_refused_before_loading(build_model, tmp_path, monkeypatch, capsys):
    save_pair(build_model("D"), tmp_path / "m")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1024)  # a device with 1 KiB free
    loaded = []
    monkeypatch.setattr("nvlm.loading.load", lambda *a, **k: loaded.append(a))
    assert main(["serve", str(tmp_path / "m"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "GiB is free" in err and "nvlm serve MODEL --dry-run" in err and len(err.strip().splitlines()) == 1
    assert loaded == []  # refused before a weight was read
    assert main(["chat", "hi", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 2


def test_what_would_fit_names_fewer_kv_tokens_or_a_smaller_scheme(d72b):
    s = Serving(tp=1, max_batch=16)
    need = plan(d72b, s)
    short_of_kv = (need["total_gib"] - need["kv_cache_gib"] / 2) * 2**30
    with pytest.raises(UserError, match="KV tokens"):
        memory.check(d72b, s, free=int(short_of_kv))
    with pytest.raises(UserError, match="--quantize int4 fits|--tp"):
        memory.check(d72b, s, free=80 * 2**30)  # bf16 72B on one 80 GiB GPU
    assert memory.check(d72b, Serving(tp=8, max_batch=1), free=80 * 2**30)["total_gib"] < 80
