"""`nvlm convert`: release → ours → release is bit-exact, converted models answer as the originals, export of
our own NVLM-D writes what vLLM reads (and refuses what it cannot serve), and conversion streams.

python -m pytest tests/test_interop_convert.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import picture, save_pair
from safetensors import safe_open

import nvlm
from nvlm.cli import main
from nvlm.data.chat import chat_prompt
from nvlm.testing.replica import release_replica


def _tensors(folder):
    """name → tensor of a weights folder, read with the safetensors library (independent of our reader)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return release_replica(tmp_path_factory.mktemp("convert") / "release", shards=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_to_ours_to_release_is_bit_exact(tmp_path, dtype):
    src = release_replica(tmp_path / "release", shards=4, dtype=dtype)
    assert main(["convert", str(src), str(tmp_path / "ours"), "--max-shard-size", "20KB"]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ours"),
                str(tmp_path / "back"),
                "--to",
                "release",
                "--max-shard-size",
                "30KB",
            ]
        )
        == 0
    )
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert a.keys() == b.keys() and len(a) > 40
    assert all(a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    assert len(list((tmp_path / "ours" / "llm").glob("model-*.safetensors"))) > 1  # our llm/ is sharded too


def test_converted_model_answers_as_the_release_folder(replica, tmp_path):
    main(["convert", str(replica), str(tmp_path / "ours")])
    (direct, direct_proc), (converted, converted_proc) = nvlm.load(replica), nvlm.load(tmp_path / "ours")
    assert converted.config.to_dict() == direct.config.to_dict()
    batch = direct_proc(chat_prompt("What is it?", 1, template="release"), [picture(150, 100)])
    with torch.no_grad():
        assert torch.equal(direct(**batch).logits, converted(**batch).logits)
    kw = dict(image=picture(120, 80, 3), max_new_tokens=12)
    answer = direct.chat(direct_proc, "Describe the picture.", **kw)
    assert answer and answer == converted.chat(converted_proc, "Describe the picture.", **kw)
    assert not (replica / "REMOTE_CODE_RAN").exists()


def test_our_nvlm_d_exports_to_the_release_layout_and_back_bit_exact(build_model, tmp_path):
    model, processor = build_model("D")
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "release"), "--to", "release"]) == 0
    out = tmp_path / "release"
    cfg = json.loads((out / "config.json").read_text())
    # what vLLM's NVLM_D reads (and no remote code: vLLM has its own config class)
    assert cfg["architectures"] == ["NVLM_D"] and cfg["model_type"] == "NVLM_D" and "auto_map" not in cfg
    assert cfg["ps_version"] == "v2" and cfg["downsample_ratio"] == 0.5 and cfg["force_image_size"] == 56
    assert cfg["llm_config"]["architectures"] == ["Qwen2ForCausalLM"] and cfg["llm_config"]["rope_theta"] == 1e6
    vc = cfg["vision_config"]
    assert vc["model_type"] == "intern_vit_6b" and vc["image_size"] == 56 and vc["patch_size"] == 14
    assert vc["num_attention_heads"] == 2 and vc["qk_normalization"] is True and vc["qkv_bias"] is False
    w = _tensors(out)
    assert {k.split(".")[0] for k in w} == {"vision_model", "mlp1", "language_model"}
    qkv = w["vision_model.encoder.layers.0.attn.qkv.weight"].view(3, 2 + 7, 16, 32)  # 7 dummy heads, all zero
    assert torch.count_nonzero(qkv[:, 2:]) == 0 and torch.count_nonzero(qkv[:, :2]) > 0
    assert w["vision_model.encoder.layers.0.attn.proj.weight"].shape == (32, 9 * 16)
    assert w["mlp1.1.weight"].shape[0] == cfg["llm_config"]["intermediate_size"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok or (out / "chat_template.jinja").is_file()
    back = nvlm.from_pretrained(out).eval()  # the release layout read back: same tensors
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = processor(chat_prompt("What?", 1), [picture(150, 100)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, back(**batch).logits)


@pytest.mark.parametrize(
    "arch,llm,vision,over,why",
    [
        ("X", "qwen2", "internvl", {}, "NVLM-X has cross-attention blocks"),
        ("D", "qwen2", "internvl", {"tags__style": "2d_grid"}, "tags must be 1-D plain text"),
        ("D", "qwen2", "internvl", {"tags__mode": "special"}, "tags must be 1-D plain text"),
        ("D", "qwen2", "clip", {}, "the vision tower is clip"),
    ],
)
def test_export_refuses_what_vllm_cannot_serve(build_model, tmp_path, capsys, arch, llm, vision, over, why):
    save_pair(build_model(arch, llm=llm, vision=vision, **over), tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "release"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot export to the release layout") and why in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_user_errors_are_one_line_exit_2(replica, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "none"), str(tmp_path / "a")], "no config.json"),
        ([str(replica), str(replica)], "exists and is not empty"),
        ([str(replica), str(tmp_path / "b"), "--to", "release"], "already is in the release layout"),
        ([str(replica), str(tmp_path / "c"), "--max-shard-size", "lots"], "--max-shard-size"),
    ]
    for args, message in cases:
        assert main(["convert", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0


_MEASURE = """
import json, sys
from nvlm.interop.convert import convert
from nvlm.testing.replica import release_replica

def rss(field):  # kB → bytes
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))[field].split()[0]) * 1024

def measured(*args, **kw):
    open("/proc/self/clear_refs", "w").write("5")  # Linux: reset the peak (VmHWM) to the current RSS
    base = rss("VmRSS")
    convert(*args, **kw)
    return base, rss("VmHWM")

warm, big, out = sys.argv[1:4]
convert(release_replica(warm + "/r", seed=1), warm + "/o")  # every import and code path once, on a tiny model
convert(warm + "/o", warm + "/b", to="release")
print(json.dumps({"to_ours": measured(big, out + "/ours"), "to_release": measured(out + "/ours", out + "/release",
                                                                                    to="release")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc/self")
@pytest.mark.slow
def test_conversion_streams_peak_rss_under_two_shards(tmp_path):
    """On a 5-shard replica of ~110 MB, converting either way raises the process's peak RSS by less than two of
    its largest shard (loading the whole model would add more than that)."""
    big = release_replica(tmp_path / "big", shards=5, llm_hidden=768, llm_ffn=2048, llm_layers=4)
    shards = sorted(big.glob("model-*.safetensors"))
    largest, total = max(f.stat().st_size for f in shards), sum(f.stat().st_size for f in shards)
    assert len(shards) >= 4 and total > 2 * largest
    (tmp_path / "warm").mkdir()
    (tmp_path / "out").mkdir()
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "warm"), str(big), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    for direction, (base, peak) in rss.items():
        assert 0 <= peak - base < 2 * largest, (direction, base, peak, largest)
