"""One construction path: every model is a skeleton (backbones on meta) that a loader fills, and its processor
lives beside it.

python -m pytest tests/test_loading.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture

import nvlm
from nvlm.data.chat import chat_prompt
from nvlm.models import fill


@pytest.mark.parametrize(("llm", "vision"), [("qwen2", "internvl"), ("llama", "siglip"), ("qwen2", "clip")])
def test_the_processor_knows_the_models_tiles_without_the_model(build_model, llm, vision):
    model, processor = build_model("H", llm=llm, vision=vision)
    assert (processor.tile_size, processor.tokens_per_tile) == (model.vision.tile_size, model.tokens_per_tile)
    assert processor.pad_id == model.config.image_token_id
    assert not hasattr(model, "processor") and not hasattr(model, "tokenizer")


def test_the_filled_llm_equals_transformers_own_load(backbones):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, _ = nvlm.build("D", llm=str(backbones["qwen2"]), vision=str(backbones["internvl"]))
    theirs = AutoModelForCausalLM.from_pretrained(backbones["qwen2"]).state_dict()
    ours = model.llm.state_dict()
    for key, value in theirs.items():  # the embedding grew by NVLM's tokens: its first rows are the file's
        assert torch.equal(ours[key][: value.shape[0]], value), key


def test_an_llm_folder_the_plan_cannot_read_is_read_by_transformers(backbones, monkeypatch):
    """A folder whose tensor names the plan does not find goes through transformers, the same model."""
    torch.manual_seed(0)
    want, processor = nvlm.build("X", llm=str(backbones["qwen2"]), vision=str(backbones["internvl"]))
    real_plan = fill.plan
    monkeypatch.setattr(
        fill, "plan", lambda model, folders, *seeds: None if "llm." in folders else real_plan(model, folders, *seeds)
    )
    torch.manual_seed(0)
    got, _ = nvlm.build("X", llm=str(backbones["qwen2"]), vision=str(backbones["internvl"]))
    assert got.state_dict().keys() == want.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_load_gives_the_saved_model_and_processor(build_model, tmp_path):
    model, processor = build_model("H", tags__mode="special")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, again = nvlm.load(tmp_path / "m")
    batch = again(chat_prompt("What is it?", 1), [picture(120, 80)])
    assert torch.equal(batch["input_ids"], processor(chat_prompt("What is it?", 1), [picture(120, 80)])["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_a_model_saved_without_its_processor_is_a_clear_error(build_model, tmp_path):
    model, _ = build_model("D")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="processor.save_pretrained"):
        nvlm.load(tmp_path / "m")


def test_tied_embeddings_stay_tied_through_the_fill(backbones, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nvlm.testing.tiny import tiny_llm_config

    cfg = tiny_llm_config()
    cfg.tie_word_embeddings = True
    folder = tmp_path / "tied"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbones["qwen2"]).save_pretrained(folder)
    model, _ = nvlm.build("D", llm=str(folder), vision=str(backbones["internvl"]))
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    theirs = AutoModelForCausalLM.from_pretrained(folder).state_dict()["model.embed_tokens.weight"]
    assert torch.equal(model.llm.get_input_embeddings().weight[: theirs.shape[0]], theirs)


def test_a_missing_llm_folder_is_named(backbones, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        nvlm.build("D", llm=str(tmp_path / "nowhere"), vision=str(backbones["internvl"]))
