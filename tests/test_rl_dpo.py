"""DPO (``train.stage=dpo``, ``nvlm.rl``): the loss is the formula, the reference log-probs are the frozen starting
model's, computed once per pair, pair files in TRL's and OpenAI's layouts are read and bad ones refused by line.

python -m pytest tests/test_rl_dpo.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import picture

from nvlm.errors import UserError
from nvlm.rl.dpo import answer_logprobs, dpo_loss
from nvlm.rl.grpo import token_logprobs
from nvlm.rl.pairs import read_pairs
from nvlm.training.build import build_model, run_model
from nvlm.training.config import RunConfig
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import Trainer


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Six pairs about pictures: TRL's standard form (images / image), its conversational form, OpenAI parts."""
    root = tmp_path_factory.mktemp("pairs")
    for i in range(3):
        picture(56 + 40 * i, 56, seed=i).save(root / f"{i}.png")
    records = [
        {"prompt": "<image>\nWhat color?", "chosen": "red", "rejected": "blue", "images": ["0.png"]},
        {"prompt": "<image>\nWhat color?", "chosen": "green", "rejected": "red", "image": "1.png"},
        {"prompt": "How many?", "chosen": "2", "rejected": "7"},
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "green"}],
            "images": ["2.png"],
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "0.png"}},
                        {"type": "text", "text": "Which shape?"},
                    ],
                }  # fmt: skip
            ],
            "chosen": "a circle",
            "rejected": "a square",
        },
        {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
    ]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def quiet(*args, **kwargs):
    pass


def dpo_cfg(backbones, path, arch="D", steps=2, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": [{"path": str(path)}], "max_seq_len": 512},
            "train": {
                "stage": "dpo",
                "max_steps": steps,
                "global_batch_size": 2,
                "micro_batch_size": 1,
                "lr": 3e-3,
                "min_lr": 3e-3,
                "rl": {"beta": 0.5},
                **train,
            },  # fmt: skip
        }
    )


def test_dpo_loss_equals_the_formula_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.5])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.1
    loss, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    for i in range(2):
        margin = beta * ((chosen[i] - ref_c[i]) - (rejected[i] - ref_r[i]))
        assert float(loss[i]) == pytest.approx(-math.log(1 / (1 + math.exp(-float(margin)))), rel=1e-6)
    torch.testing.assert_close(rc, beta * (chosen - ref_c))
    torch.testing.assert_close(rr, beta * (rejected - ref_r))
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    assert answer_logprobs(logp, mask).tolist() == [-5.0, -0.75]


def test_pair_layouts_are_read(pairs):
    records = read_pairs(pairs)
    assert [len(r.prompt.images) for r in records] == [1, 1, 0, 1, 1, 0]
    assert [r.chosen for r in records][3:5] == ["blue", "a circle"]
    assert records[3].prompt.messages == [{"role": "user", "content": "<image>\nWhat color?"}]


@pytest.mark.parametrize(
    "line, says",
    [
        ('{"prompt": "hi", "chosen": "a"}', r"pairs.jsonl:2: missing \['rejected'\]"),
        ("{not json", r"pairs.jsonl:2: not valid JSON .*fix or remove that line"),
        (
            '{"prompt": "<image>\\nhi", "chosen": "a", "rejected": "b"}',
            r"pairs.jsonl:2: 1 <image> placeholder\(s\) but 0",
        ),
        ('{"prompt": "hi", "chosen": 3, "rejected": "b"}', r"pairs.jsonl:2: 'chosen' must be a string"),
    ],
)
def test_a_bad_pair_file_is_refused_naming_the_line(tmp_path, backbones, line, says):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(UserError, match=says) as e:
        Trainer(dpo_cfg(backbones, path), tmp_path / "out", log=quiet, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["D", "X"])
def test_reference_logprobs_are_the_starting_models(backbones, pairs, tmp_path, arch):
    cfg = dpo_cfg(backbones, pairs, arch, steps=3)
    trainer = Trainer(cfg, tmp_path, log=quiet, progress=False)
    trainer.run()
    step = trainer.rl
    assert len(step.ref_cache) == 6  # every pair, once, before the first step
    frozen = build_model(cfg, run_model(cfg))[0].eval()  # the starting weights, as the run built them
    records = trainer.stream.records
    from nvlm.rl.pairs import encode_pair

    for i in (0, 3, 4):
        pair = encode_pair(trainer.processor, records[i], i)
        batch = step.batch([pair])
        mask = batch["labels"][:, 1:] != -100
        with torch.no_grad():
            want = answer_logprobs(token_logprobs(frozen, batch)[0], mask)
            now = answer_logprobs(token_logprobs(trainer.model, batch)[0], mask)
        torch.testing.assert_close(torch.tensor(step.ref_cache[i]), want, atol=1e-5, rtol=0)
        assert not torch.allclose(now, want, atol=1e-3)  # the policy moved; the reference did not
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the first step
    assert {"dpo/accuracy", "dpo/margin"} <= set(rows[0])


def test_with_lora_the_reference_is_the_starting_model(backbones, pairs, tmp_path):
    """LoRA keeps no second copy either: the reference log-probs are the starting model's (adapters at zero)."""
    from nvlm.rl.pairs import encode_pair

    cfg = dpo_cfg(backbones, pairs, "D", steps=2, lora={"r": 4, "alpha": 8})
    trainer = Trainer(cfg, tmp_path, log=quiet, progress=False)
    trainer.run()
    frozen = build_model(cfg, run_model(cfg))[0].eval()
    for i in (0, 2):
        batch = trainer.rl.batch([encode_pair(trainer.processor, trainer.stream.records[i], i)])
        with torch.no_grad():
            start = answer_logprobs(*token_logprobs(frozen, batch))
        torch.testing.assert_close(torch.tensor(trainer.rl.ref_cache[i]), start, atol=1e-5, rtol=0)
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)


def test_pair_files_are_drawn_by_their_weights():
    from nvlm.rl.pairs import weighted_epoch

    spans = [(0, 4, 3.0), (4, 4, 1.0)]  # two files of 4 pairs; the first weighs 3 times the second
    order = weighted_epoch(spans, "0:0")
    assert len(order) == 8 and sum(i < 4 for i in order) == 6  # 8 × 3/4 from the first file
    assert set(i for i in order if i < 4) == {0, 1, 2, 3}  # upsampled: every pair of it, some twice
    assert order == weighted_epoch(spans, "0:0") and order != weighted_epoch(spans, "0:1")
    third = weighted_epoch([(0, 2, 1.0), (2, 1, 1.0), (3, 4, 1.0)], "s")  # 7 slots, 7/3 each: 3, 2, 2
    assert sorted(sum(a <= i < a + n for i in third) for a, n in ((0, 2), (2, 1), (3, 4))) == [2, 2, 3]
    zero = weighted_epoch([(0, 3, 1.0), (3, 2, 0.0)], "s")
    assert len(zero) == 5 and set(zero) == {0, 1, 2}  # weight 0: never drawn, its slots go to the other file


def test_one_pair_file_keeps_its_permutation(pairs):
    from types import SimpleNamespace

    from nvlm.rl.pairs import PairStream

    one = SimpleNamespace(path=str(pairs), image_root=None, weight=5.0)
    stream = PairStream([one], None, None, 7, 0, 1)
    assert sorted(stream._order(0)) == list(range(6))  # each pair once an epoch, whatever its weight
    two = PairStream([one, SimpleNamespace(path=str(pairs), image_root=None, weight=0.0)], None, None, 7, 0, 1)
    assert len(two.records) == 12 and all(i < 6 for i in two._order(0))  # weight 0: never drawn
