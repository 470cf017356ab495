"""Freezing per stage (paper §4.5): stage 1 leaves LLM and vision bit-identical after optimizer steps.

python -m pytest tests/test_stages.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture

from nvlm.data.chat import chat_prompt
from nvlm.training.stages import apply_stage, trainable_table


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    batch = model.processor(chat_prompt("Describe.", 1) + "a red box", [picture(150, 100)], padding_side="right")
    model.train()
    for _ in range(steps):
        logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:].to(logits.device))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_stage1_leaves_llm_and_vision_bit_identical(build_model, arch):
    model = build_model(arch)
    apply_stage(model, "pretrain")
    llm, vision = _snapshot(model.llm), _snapshot(model.vision)
    proj, xattn = _snapshot(model.projector), _snapshot(model.xattn)
    _train_steps(model)
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm.items())
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision.items())
    # what stage 1 trains did change (X's projector only once the zero-initialised gates have opened)
    assert any(not torch.equal(v, model.projector.state_dict()[k]) for k, v in proj.items())
    if arch != "D":
        assert any(not torch.equal(v, model.xattn.state_dict()[k]) for k, v in xattn.items())
        assert any(b.gate_attn.item() != 0.0 for b in model.xattn)


def test_stage2_trains_llm_and_table(build_model):
    model = build_model("H")
    apply_stage(model, "sft")
    llm = _snapshot(model.llm)
    _train_steps(model, 1)
    assert any(not torch.equal(v, model.llm.state_dict()[k]) for k, v in llm.items())
    table = trainable_table(model)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert rows["vision"][0] == "0" and rows["llm"][1] == "0" and rows["xattn"][1] == "0"
    apply_stage(model, "sft", freeze_llm=True)
    assert not any(p.requires_grad for p in model.llm.parameters())
    apply_stage(model, "pretrain", unfreeze_vision=True)
    assert all(p.requires_grad for p in model.vision.parameters())
    with pytest.raises(ValueError, match="stage must be one of"):
        apply_stage(model, "stage3")
