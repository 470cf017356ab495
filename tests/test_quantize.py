"""Weight-only quantization (torchao) while loading: the keep-list, the error against full precision, the one-module
-at-a-time fill, and ``nvlm quantize`` folders that load back to the same outputs.

python -m pytest tests/test_quantize.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, save_pair
from torch import nn

import nvlm
from nvlm.data.chat import chat_prompt
from nvlm.errors import UserError
from nvlm.inference.quantize import Quantizer, is_quantized, summary
from nvlm.inference.schemes import DEFAULT_KEEP

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, backbones):
    """{arch: a saved tiny NVLM-arch folder}."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in "DXH":
        torch.manual_seed(0)
        save_pair(nvlm.build(arch, llm=str(backbones["qwen2"]), vision=str(backbones["internvl"])), root / arch)
        out[arch] = root / arch
    return out


def _batch(processor):
    return processor(chat_prompt("What is in the picture?", 1), [picture(120, 80)])


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_the_keep_list_is_honoured(saved, arch):
    model, _ = nvlm.load(saved[arch], quantize="int8")
    linears = _linears(model)
    for name, m in linears.items():
        assert is_quantized(m.weight) == (not name.startswith(DEFAULT_KEEP)), name
    assert any(n.startswith("vision.") for n in linears) and any(n.startswith("projector.") for n in linears)
    assert not is_quantized(model.llm.get_input_embeddings().weight)
    for block in model.xattn:  # the gates are no Linears: full precision
        assert block.gate_attn.dtype == torch.float32 and not is_quantized(block.gate_attn)
    if arch != "D":
        assert is_quantized(model.xattn[0].q_proj.weight)  # the x-attn blocks' Linears are the LLM's side


def test_a_custom_keep_list(saved):
    model, _ = nvlm.load(saved["D"], quantize="int8", quantize_keep=("vision.", "llm.model.layers.0."))
    linears = _linears(model)
    assert is_quantized(linears["projector.linear_1"].weight)
    assert is_quantized(linears["llm.lm_head"].weight)
    assert not is_quantized(linears["llm.model.layers.0.self_attn.q_proj"].weight)
    assert is_quantized(linears["llm.model.layers.1.self_attn.q_proj"].weight)


@pytest.mark.parametrize(("scheme", "bound"), [("int8", 0.02), ("int4", 0.5), ("fp8", 0.2)])
def test_quantized_logits_stay_close_to_full_precision(saved, scheme, bound):
    full, processor = nvlm.load(saved["D"])
    quant, _ = nvlm.load(saved["D"], quantize=scheme)
    batch = _batch(processor)
    want, got = _logits(full, batch), _logits(quant, batch)
    err = (got - want).abs().max().item()
    print(f"\n{scheme}: tiny NVLM-D logits max abs error {err:.4g} (logits up to {want.abs().max().item():.3g})")
    assert 0 < err < bound  # quantized (not the same numbers), and close
    assert summary(quant)["quantized"] == sum(1 for n in _linears(full) if not n.startswith(DEFAULT_KEEP))


def test_the_full_precision_llm_is_never_whole(saved, monkeypatch):
    """Each Linear is quantized as soon as it is filled: at most one target is in full precision at a time."""
    most = []
    real = Quantizer.module_filled

    def watch(self, name, module):
        real(self, name, module)
        model = watch.model
        pending = [n for n, m in model.named_modules() if n in self.names and not m.weight.is_meta]
        most.append(sum(not is_quantized(model.get_submodule(n).weight) for n in pending))

    def init(self, model, *a, **k):
        watch.model = model
        real_init(self, model, *a, **k)

    real_init = Quantizer.__init__
    monkeypatch.setattr(Quantizer, "__init__", init)
    monkeypatch.setattr(Quantizer, "module_filled", watch)
    nvlm.load(saved["X"], quantize="int8")
    assert most and max(most) == 0  # quantized before the next module is read


@pytest.mark.parametrize("arch", ["D", "H"])
def test_a_quantized_folder_loads_back_to_the_same_outputs(saved, arch, tmp_path, capsys):
    from nvlm.cli import main

    assert main(["quantize", str(saved[arch]), str(tmp_path / "q"), "--scheme", "int8", "--device", "cpu"]) == 0
    assert "Linears int8" in capsys.readouterr().out
    quant, processor = nvlm.load(saved[arch], quantize="int8", dtype=torch.float32)
    again, processor2 = nvlm.load(tmp_path / "q")
    batch = _batch(processor)
    assert torch.equal(batch["input_ids"], _batch(processor2)["input_ids"])
    assert torch.equal(_logits(again, batch), _logits(quant, batch))
    assert summary(again) == summary(quant)
    assert not any(p.is_meta for p in again.parameters())
    with pytest.raises(UserError, match="already quantized"):
        nvlm.load(tmp_path / "q", quantize="int4")


def test_the_release_layout_is_quantized_shard_by_shard(tmp_path):
    from nvlm.testing.replica import release_replica

    root = release_replica(tmp_path / "release")
    full, processor = nvlm.load(root)
    quant, _ = nvlm.load(root, quantize="int8")
    assert is_quantized(quant.llm.model.layers[0].mlp.down_proj.weight)
    assert not is_quantized(quant.vision.model.encoder.layer[0].attention.q_proj.weight)
    batch = processor(chat_prompt("Describe.", 1), [picture(56, 56)])
    want = _logits(full, batch)
    err = (_logits(quant, batch) - want).abs().max().item()
    assert 0 < err < 0.05 * want.abs().max().item()  # int8: within 5 % of the largest logit


def test_a_bad_scheme_and_lora_folders_are_clear_errors(saved, tmp_path):
    with pytest.raises(UserError, match="int8, int4, fp8"):
        nvlm.load(saved["D"], quantize="int3")
    import shutil

    shutil.copytree(saved["D"], tmp_path / "lora")
    (tmp_path / "lora" / "llm_adapter").mkdir()
    (tmp_path / "lora" / "llm_adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="nvlm merge"):
        nvlm.load(tmp_path / "lora", quantize="int8")
