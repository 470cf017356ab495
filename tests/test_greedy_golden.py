"""Token ids that generation produced before the serving engine and ``generate`` shared one runner, recorded
once (``NVLM_RECORD_GOLDEN=1``) and asserted since: greedy and seeded outputs for D, X and H, one prompt and a
left-padded batch, are unchanged by the rewrite. The X and H entries were recorded again, with the same code,
when a new model's x-attn blocks came to be drawn a few rows at a time (``nvlm.models.xattn_init``): their
starting weights changed, not how generation runs; the D entries stayed as first recorded.

python -m pytest tests/test_greedy_golden.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids

GOLDEN = Path(__file__).parent / "data" / "greedy_golden.json"
CASES = {
    "one": ([chat_prompt("Describe.", 1)], [[picture(150, 100)]]),
    "batch": (
        [chat_prompt("Describe.", 1), chat_prompt("Hi", 0), chat_prompt("Compare the two.", 2)],
        [[picture(150, 100)], [], [picture(120, 60, 1), picture(50, 50, 2)]],
    ),
}
SETTINGS = {"greedy": {}, "seeded": {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 7}}


def _ids(model, processor, case: str, setting: str) -> list[list[int]]:
    texts, images = CASES[case]
    steps = generate_ids(model, processor(texts, images), 12, **SETTINGS[setting])
    return torch.stack(list(steps), 1).tolist()


@pytest.mark.parametrize(("arch", "llm"), [("D", "qwen2"), ("X", "qwen2"), ("H", "qwen2"), ("D", "llama")])
def test_generation_equals_the_recorded_tokens(build_model, arch, llm):
    model, processor = build_model(arch, llm=llm, vision="internvl" if llm == "qwen2" else "siglip")
    set_gates(model, 0.5)
    got = {f"{c}/{s}": _ids(model, processor, c, s) for c in CASES for s in SETTINGS}
    key = f"{arch}/{llm}"
    if os.environ.get("NVLM_RECORD_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[key] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())[key]
    assert got == want
