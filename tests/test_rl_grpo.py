"""GRPO (``train.stage=grpo``, ``nvlm.rl``): rollouts on our own runner see the training prompt, the loss and the
advantages are the formulas, a run resumes exactly and raises its reward.

python -m pytest tests/test_rl_grpo.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import picture, set_gates, write_color_dataset

from nvlm.data.formats import Conversation, chatml_segments
from nvlm.rl.grpo import group_advantages, grpo_loss, token_logprobs
from nvlm.rl.rewards import REWARDS, Completion, register_reward, score
from nvlm.rl.rollout import rollout, split_answer, with_completion
from nvlm.training.config import ConfigError, RunConfig
from nvlm.training.metrics import read_metrics
from nvlm.training.trainer import Trainer


def _digits(prompt: str, c: Completion, reference: str) -> float:
    """A reward a tiny random model can move in a few steps: the share of its characters that are digits."""
    text = c.text.replace(" ", "")
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


register_reward("test_digits", _digits)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("data"), 12, 4)


def quiet(*args, **kwargs):
    pass


def grpo_cfg(backbones, dataset, arch="D", steps=4, **rl) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": [{"path": str(dataset / "images.jsonl")}], "max_seq_len": 512},
            "train": {
                "stage": "grpo",
                "max_steps": steps,
                "global_batch_size": 2,
                "micro_batch_size": 1,
                "lr": 3e-3,
                "min_lr": 3e-3,
                "rl": {"group_size": 4, "max_new_tokens": 4, "rewards": ["test_digits"], **rl},
            },
        }
    )


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_rollout_prompt_is_the_training_prompt(build_model, arch):
    """The rows the loss sees start with exactly the ids the runner was prefilled with, and the training
    forward gives each sampled token the log-probability the runner sampled it with (same tokens, same
    images, same x-attn memory)."""
    model, proc = build_model(arch)
    if arch != "D":
        set_gates(model, 0.5)  # open the x-attn blocks, so the image reaches the completions
    convs = [
        Conversation(
            [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": a}],
            [picture(w, h, seed=i)],
        )  # fmt: skip
        for i, (a, w, h) in enumerate([("red", 56, 56), ("blue", 150, 100)])
    ]
    samples = [proc.encode_segments(chatml_segments(c), c.images) for c in convs]
    prompts, answers = zip(*(split_answer(s) for s in samples), strict=True)
    assert [proc.tokenizer.decode(a, skip_special_tokens=True) for a in answers] == ["red", "blue"]
    gen = torch.Generator().manual_seed(0)
    ro = rollout(model, proc, list(prompts), 3, 5, eos_ids=[proc.tokenizer.eos_token_id], generator=gen)
    rows = [with_completion(prompts[i // 3], c) for i, c in enumerate(ro.completions)]
    batch = proc.collate(rows, padding_side="right")
    for i, row in enumerate(rows):
        p = ro.prompt_ids[i // 3]
        assert p == samples[i // 3].input_ids[: len(p)]  # the sample's own ids, cut before the answer
        assert row.input_ids == p + ro.completions[i]
        assert batch["input_ids"][i, : len(p)].tolist() == p
    with torch.no_grad():
        logp, mask = token_logprobs(model, batch)
    for i, lps in enumerate(ro.logprobs):
        assert int(mask[i].sum()) == len(lps) == len(ro.completions[i])
        torch.testing.assert_close(logp[i][mask[i]], torch.tensor(lps), atol=2e-4, rtol=0)


@pytest.mark.parametrize("fixed", [False, True])
def test_rollout_decodes_every_step_under_torchrun(build_model, fixed):
    """Under torchrun (``fixed_steps``) a process whose completions all ended still takes every decoding step,
    so it joins the sharded forwards of processes still decoding; alone it stops when all rows are done."""
    model, proc = build_model("D")
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    prompt = proc.encode("<|im_start|>user\nWhat color?<|im_end|>\n<|im_start|>assistant\n")
    every_token = list(range(len(proc.tokenizer)))  # whatever is sampled ends the completion
    ro = rollout(model, proc, [prompt], 2, 6, eos_ids=every_token, fixed_steps=fixed)
    hook.remove()
    assert [len(c) for c in ro.completions] == [1, 1] and ro.finished == [True, True]
    assert len(calls) == (1 + 5 if fixed else 1)  # the prefill, then a decoding step per further token


def test_grpo_loss_equals_the_formula_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    old = torch.tensor([[-1.2, -1.9, -0.5], [-0.3, -1.0, 0.0]])
    ref = torch.tensor([[-1.1, -2.5, -0.4], [-0.2, -0.7, 0.0]])
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    eps, beta = 0.2, 0.05
    parts = grpo_loss(logp, old, adv, mask, eps, ref, beta)
    want, clipped, kl_total = 0.0, 0, 0.0
    for i in range(2):
        for j in range(3):
            if not mask[i, j]:
                continue
            ratio = math.exp(logp[i, j] - old[i, j])
            a = float(adv[i])
            bounded = min(max(ratio, 1 - eps), 1 + eps)
            d = float(ref[i, j] - logp[i, j])
            kl = math.exp(d) - d - 1
            want += -min(ratio * a, bounded * a) + beta * kl
            clipped += bounded * a < ratio * a
            kl_total += kl
    assert parts.tokens == 5
    assert parts.clipped == clipped == 1  # (0, 0): ratio e^0.2 > 1 + eps with A > 0 (not (1, 1): A < 0, ratio > 1)
    assert float(parts.loss_sum) == pytest.approx(want, rel=1e-6)
    assert parts.kl_sum == pytest.approx(kl_total, rel=1e-6)


def test_advantages_are_group_normalised_and_zero_for_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0])
    adv = group_advantages(rewards, 4, eps=1e-4)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    second = torch.tensor([0.0, 1.0, 2.0, 3.0])
    expect = (second - 1.5) / (second.std() + 1e-4)  # unbiased std of the group
    torch.testing.assert_close(adv[4:], expect)


def test_rewards_wrap_the_scorers_and_unknown_names_are_refused(backbones, dataset):
    c = [Completion("Blue.", True), Completion("3,000 apples", False), Completion("", True)]
    got = score(["exact_match", "numeric", "format", "vqa_accuracy"], ["q"] * 3, c, ["blue", "3000", "x"])
    assert got == {
        "exact_match": [1.0, 0.0, 0.0],
        "numeric": [0.0, 1.0, 0.0],
        "format": [1.0, 0.0, 0.0],
        "vqa_accuracy": [1.0, 0.0, 0.0],
    }
    assert {"relaxed_accuracy", "anls"} <= set(REWARDS)
    with pytest.raises(ConfigError, match=r"unknown reward\(s\) \['bleu'\]; known: .*exact_match"):
        grpo_cfg(backbones, dataset, rewards=["bleu"])
    with pytest.raises(ConfigError, match="group_size"):
        grpo_cfg(backbones, dataset, group_size=1)
    with pytest.raises(ConfigError, match="unknown key"):
        grpo_cfg(backbones, dataset, groups=4)


def _rows(out):
    timing = {"samples_per_s", "data_wait_s", "rollout_s", "train_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out / "metrics.jsonl")]


def test_grpo_resume_is_exact(backbones, dataset, tmp_path):
    cfg = grpo_cfg(backbones, dataset, "H", steps=4, kl_coef=0.1, updates_per_rollout=2)
    Trainer(cfg, tmp_path / "straight", log=quiet, progress=False).run()
    first = Trainer(cfg, tmp_path / "stopped", log=quiet, progress=False)
    original = first.optimizer_step

    def stop_after_2(batches):
        out = original(batches)
        if first.step == 2:
            first._stop = True
        return out

    first.optimizer_step = stop_after_2
    assert first.run().steps == 2
    assert Trainer(cfg, tmp_path / "stopped", log=quiet, progress=False).run().steps == 4
    straight, stopped = _rows(tmp_path / "straight"), _rows(tmp_path / "stopped")
    assert len(straight) == 4 and straight == stopped  # bit-identical losses, rewards, KL, clip fractions
    assert any(r["loss"] != 0 for r in straight) and any(r["kl"] > 0 for r in straight[1:])


def test_tiny_grpo_run_raises_the_reward(backbones, dataset, tmp_path):
    cfg = grpo_cfg(backbones, dataset, "D", steps=14, group_size=8)
    cfg.train.lr = cfg.train.min_lr = 2e-2
    Trainer(cfg, tmp_path, log=quiet, progress=False).run()
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean reward, first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last > first + 0.3, rewards


def test_completions_are_cut_to_max_seq_len():
    from nvlm.rl.step import fit_completions

    ids, done = fit_completions([5, 5, 8], [[1, 2, 9], [1, 9], [1, 2, 9]], [True, True, True], 8)
    assert ids == [[1, 2, 9], [1, 9], []] and done == [True, True, False]  # 5 + 3 fits 8; 8 + 0 is full
    ids, done = fit_completions([6], [[1, 2, 9]], [True], 8)
    assert ids == [[1, 2]] and done == [False]  # cut before its end token: not ended by itself


def test_grpo_rows_fit_max_seq_len(backbones, dataset, tmp_path, monkeypatch):
    from nvlm.rl.step import GRPOStep

    seen: list[int] = []
    original = GRPOStep._updates

    def record(self, rows, advantages, optimizer):
        seen.extend(len(r.input_ids) for r in rows)
        return original(self, rows, advantages, optimizer)

    monkeypatch.setattr(GRPOStep, "_updates", record)
    cfg = grpo_cfg(backbones, dataset, "D", steps=1, max_new_tokens=16)
    Trainer(cfg, tmp_path / "free", log=quiet, progress=False).run()
    longest = max(seen)  # the longest prompt + completion with room to spare
    cfg.data.max_seq_len = longest - 4
    seen.clear()
    Trainer(cfg, tmp_path / "capped", log=quiet, progress=False).run()
    assert seen and max(seen) == longest - 4  # the same draws (seeded per step), the long ones cut at the limit


def test_stats_count_the_groups_that_teach():
    from types import SimpleNamespace

    from nvlm.distributed.parallel import World
    from nvlm.rl.step import GRPOStep

    step = GRPOStep.__new__(GRPOStep)
    step.rl, step.world = SimpleNamespace(group_size=4), World()
    step.stats = {"kl": 0.0, "clip_fraction": 0.0}
    # three groups of 4: all right, all wrong (no advantage either way), and mixed
    rewards = {"exact_match": [1.0] * 4 + [0.0] * 4 + [1.0, 0.0, 0.0, 1.0]}
    out = step._stats(rewards, [[1, 2]] * 12, 1.0, 2.0)
    assert out["mixed_groups"] == pytest.approx(1 / 3) and out["reward/mean"] == pytest.approx(6 / 12)
