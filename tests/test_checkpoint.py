"""save_pretrained → from_pretrained gives identical logits; the format has no pickle; configs are strict.

python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import picture, set_gates

import nvlm
from nvlm.config import ConfigError, NVLMConfig, apply_overrides
from nvlm.data.chat import chat_prompt


@pytest.mark.parametrize("arch,tags", [("D", {}), ("X", {"tags__mode": "special"}), ("H", {"tags__style": "2d_grid"})])
def test_save_load_identical_logits(build_model, tmp_path, arch, tags):
    model, processor = build_model(arch, **tags)
    set_gates(model, 0.3)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.01)  # make sure trained (non-initial) projector weights are what gets saved
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    loaded, loaded_proc = nvlm.load(tmp_path / "ckpt")
    assert loaded.config.to_dict() == model.config.to_dict()
    batch2 = loaded_proc(chat_prompt("Describe.", 1), [picture(150, 100)])
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch2).logits, before)


def test_special_token_mode_tags_are_single_tokens(build_model):
    model, processor = build_model("D", tags__mode="special")
    for tag in ("<tile_1>", "<tile_6>", "<tile_global_thumbnail>", "<Image>", "</Image>"):
        assert len(processor.tokens(tag)) == 1
    text_mode, text_mode_proc = build_model("D")
    assert len(text_mode_proc.tokens("<tile_1>")) > 1  # released behaviour: plain BPE text
    assert model.llm.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    cfg = NVLMConfig(arch="X")
    data = cfg.to_dict()
    assert NVLMConfig.from_dict(data).to_dict() == data
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tile_sise'\] in tiling"):
        NVLMConfig.from_dict({**data, "tiling": {**data["tiling"], "tile_sise": 3}})
    with pytest.raises(ConfigError, match="arch must be one of"):
        NVLMConfig.from_dict({**data, "arch": "Z"})
    with pytest.raises(ConfigError, match="tags.style"):
        apply_overrides(cfg, {"tags.style": "3d"})
    with pytest.raises(ConfigError, match="unknown config key 'xattn.evry'"):
        apply_overrides(cfg, {"xattn.evry": 2})
    assert apply_overrides(cfg, {"xattn.every": 3}).xattn.every == 3
    (tmp_path / "c.json").write_text(json.dumps({**data, "extra": 1}))
    with pytest.raises(ConfigError, match="extra"):
        NVLMConfig.load(tmp_path / "c.json")


def test_from_pretrained_refuses_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an nvlm checkpoint"):
        nvlm.from_pretrained(tmp_path)


def test_config_values_are_type_checked_when_read():
    from nvlm.training.config import RunConfig

    with pytest.raises(ConfigError, match=r"tiling\.max_tiles must be an integer, got '6' \(str\)"):
        NVLMConfig.from_dict({"tiling": {"max_tiles": "6"}})
    with pytest.raises(ConfigError, match=r"tiling\.use_thumbnail must be true or false, got 1"):
        NVLMConfig.from_dict({"tiling": {"use_thumbnail": 1}})
    with pytest.raises(ConfigError, match=r"train\.max_steps must be an integer, got 'ten'"):
        RunConfig.from_dict({"train": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"train\.lr must be a number, got True"):
        RunConfig.from_dict({"train": {"lr": True}})
    assert RunConfig.from_dict({"train": {"lr": 1}}).train.lr == 1  # an integer is a number
