"""The rl-vs-sft claim: its out-of-distribution count sets, its arms' stage configs, and (slow) one tiny run."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from nvlm.repro import claims, report, rl
from nvlm.repro import tasks as rtasks
from nvlm.repro.run import SCALES, _key


def test_out_of_distribution_counts_and_canvases():
    from nvlm.demo import draw

    rng = random.Random(0)
    for _ in range(50):
        wide = rtasks.sample_count_beyond(rng, (1, 5), rtasks.WIDE_GRIDS)
        tiles = (wide.width // draw.TILE) * (wide.height // draw.TILE)
        assert tiles in (8, 9) and tiles > max(c * r for c, r in draw.GRIDS)  # beyond every training canvas
        assert 1 <= int(wide.answer) <= 5 and len(wide.ops) == int(wide.answer)
        many = rtasks.sample_count_beyond(rng, (6, 7), rtasks.MANY_GRIDS)
        assert int(many.answer) in (6, 7) and len(many.ops) == int(many.answer)
        boxes = [
            op[1] if op[0] != "polygon" else (op[1][2][0], op[1][0][1], op[1][1][0], op[1][1][1]) for op in many.ops
        ]
        for i, a in enumerate(boxes):  # no two shapes touch: >= 2 background pixels between their boxes
            for b in boxes[i + 1 :]:
                assert a[2] + 2 < b[0] or b[2] + 2 < a[0] or a[3] + 2 < b[1] or b[3] + 2 < a[1]


def test_out_of_distribution_sets_are_deterministic(tmp_path):
    for d in ("a", "b"):
        assert rtasks.generate_count_ood(tmp_path / d, 5) == {"count_wide": 5, "count_many": 5}
    for name in rtasks.COUNT_OOD:
        text = (tmp_path / "a" / "test" / f"{name}.jsonl").read_text()
        assert text == (tmp_path / "b" / "test" / f"{name}.jsonl").read_text()
        rec = json.loads(text.splitlines()[0])
        assert rec["conversations"][0]["value"] == "<image>\nHow many shapes are there?"
        assert (tmp_path / "a" / rec["image"]).exists()


def test_arms_share_stages_one_and_two_and_differ_only_in_the_third():
    c, scale, root = claims.claim("rl-vs-sft"), SCALES["default"], Path("/r")
    by_arm = {a.name: rl.stage_configs(root, scale, a, 3, []) for a in c.arms}
    for grpo, sft in (("GRPO", "more SFT"), ("GRPO, NVLM-X", "more SFT, NVLM-X")):
        g, s = by_arm[grpo], by_arm[sft]
        assert _key(g[0]) == _key(s[0]) and _key(g[1]) == _key(s[1])  # one stage-2 model for both
        assert g[2].train.stage == "grpo" and s[2].train.stage == "sft"
        for cfg in (g[2], s[2]):
            assert [Path(src["path"]).name for src in cfg.data.sources] == ["count.jsonl"]
            assert cfg.train.max_steps == scale.rl_steps and cfg.train.seed == 3
            assert cfg.train.lr == cfg.train.min_lr  # constant
        # as many labelled sequences a step: SFT's samples = GRPO's prompts × group
        assert s[2].train.global_batch_size == g[2].train.global_batch_size * g[2].train.rl.group_size
        assert g[2].train.lr == scale.rl_lr and s[2].train.lr == g[1].train.min_lr
    assert by_arm["GRPO"][1].model.arch == "D" and by_arm["GRPO, NVLM-X"][1].model.arch == "X"
    stage1, stage2 = by_arm["GRPO"][:2]  # the quick demo's stages, which teach count (held out: 0.41 for D)
    assert (stage1.train.max_steps, stage2.train.max_steps) == (scale.rl_stage1_steps, scale.rl_stage2_steps)
    assert stage2.train.global_batch_size == scale.rl_stage_batch


def test_claim_is_checked_like_the_others_and_not_in_all():
    c = claims.claim("rl-vs-sft")
    assert "rl-vs-sft" not in claims.NAMES and "rl-vs-sft" in claims.EXTRA
    assert len(c.mechanism) > 80 and c.validity is not None and c.validity.arm in {a.name for a in c.arms}
    assert report.chance(c.validity.metric, c.tasks) == pytest.approx(1 / 5)
    for _, _, metric in c.comparisons:
        assert report.chance(metric, c.tasks) is not None
    assert report.chance("many_accuracy", c.tasks) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="after_sft"):
        rl.stage_configs(Path("/r"), SCALES["quick"], claims.Arm("odd", "D", after_sft="dpo"), 0, [])


@pytest.mark.slow
def test_rl_vs_sft_end_to_end_at_tiny_budget(tmp_path):
    from nvlm.repro.cli import run_claim
    from tests.test_repro import TINY, _check_outputs

    scale = dataclasses.replace(
        TINY, rl_stage1_steps=2, rl_stage2_steps=3, rl_stage_batch=4, rl_steps=1, rl_prompts=2, rl_group=2
    )
    run_claim("rl-vs-sft", tmp_path, "D", 1, scale, [], "cpu")
    s = _check_outputs(tmp_path, "rl-vs-sft")
    assert len(s["runs"]) == 4
    for run in s["runs"]:
        for m in ("count_accuracy", "wide_accuracy", "many_accuracy", "start_count_accuracy"):
            assert 0 <= run["metrics"][m] <= 1
        assert run["config"]["stage3"]["train"]["stage"] == ("grpo" if "GRPO" in run["arm"] else "sft")
        assert (run["rollout_s"] > 0) == ("GRPO" in run["arm"]) and len(run["rewards"]) == ("GRPO" in run["arm"])
    starts = {r["arm"]: r["metrics"]["start_count_accuracy"] for r in s["runs"]}
    assert starts["GRPO"] == starts["more SFT"]  # both third stages start from the same stage-2 model
    assert len(list((tmp_path / "stage2").iterdir())) == 2  # one per architecture
