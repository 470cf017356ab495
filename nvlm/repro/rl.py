"""One arm × seed of the ``rl-vs-sft`` claim: the demo's two stages, then GRPO or more SFT on ``count`` alone.

Stages 1 and 2 are the demo recipe's (``nvlm.demo.pipeline.stage_config``, at the quick demo's steps and batch:
``Scale.rl_stage*``; with the arm's model overrides and the user's ``--set``), shared by every arm of one
architecture and seed: both third stages start from the very same stage-2 model. The third stage reads only
``train/count.jsonl`` (1–5 shapes):

* GRPO (``train.stage=grpo``): ``rl_prompts`` images a step, ``rl_group`` sampled answers each, exact-match
  reward, ``rl_lr`` constant;
* more SFT (``train.stage=sft``): ``rl_prompts × rl_group`` samples a step, as many labelled sequences as GRPO
  trains on (GRPO pays its rollouts on top), at the stage-2 schedule's final learning rate, constant.

Both are evaluated greedily on the held-out ``count`` items and on two sets no training image resembles
(``nvlm.repro.tasks.COUNT_OOD``): 8–9 tile canvases (``count_wide``) and 6–7 shapes (``count_many``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from nvlm.demo.pipeline import stage_config
from nvlm.repro import tasks as rtasks
from nvlm.repro.claims import Arm, Claim
from nvlm.training.config import RLConfig, RunConfig, override
from nvlm.training.metrics import read_metrics

EVAL_SETS = {"count": "count_accuracy", "count_wide": "wide_accuracy", "count_many": "many_accuracy"}


def accuracy(loaded: Any, data: Path, name: str, batch_size: int = 50) -> float:
    """Greedy exact match of (model, processor) on ``test/{name}.jsonl``."""
    from nvlm.data.chat import render_chat
    from nvlm.data.formats import read_records

    model, processor = loaded
    model.eval()
    convs = list(read_records(data / "test" / f"{name}.jsonl", image_root=data))
    right = 0
    for i in range(0, len(convs), batch_size):
        chunk = convs[i : i + batch_size]
        prompts = [render_chat(c.messages[:-1]) for c in chunk]
        answers = model.generate(processor, prompts, [c.images for c in chunk], max_new_tokens=3)
        right += sum(rtasks.score(a, c.messages[-1]["content"]) for a, c in zip(answers, chunk, strict=True))
    return right / len(convs)


def evaluate_counts(checkpoint: Path | None, data: Path) -> dict[str, float]:
    import nvlm

    if checkpoint is None:  # a run stopped before its first checkpoint
        raise RuntimeError("no final checkpoint to evaluate")
    loaded = nvlm.load(checkpoint)
    return {metric: accuracy(loaded, data, name) for name, metric in EVAL_SETS.items()}


def stage_configs(root: Path, scale: Any, arm: Arm, seed: int, sets: list[str]) -> tuple[RunConfig, ...]:
    """The arm's stage 1, stage 2 and third-stage run configs (init_from filled in by `run_rl_arm`)."""
    budget = dataclasses.replace(scale.budget(), stage1_steps=scale.rl_stage1_steps,
                                 stage2_steps=scale.rl_stage2_steps, batch=scale.rl_stage_batch)  # fmt: skip
    s1, s2 = (stage_config(arm.arch, stage, root, budget, seed=seed) for stage in ("pretrain", "sft"))
    s1, s2 = (
        dataclasses.replace(c, model=dataclasses.replace(c.model, overrides={**c.model.overrides, **arm.model}))
        for c in (s1, s2)
    )
    count = {"path": str(root / "data" / "train" / "count.jsonl"), "weight": 1.0, "image_root": str(root / "data")}
    grpo = arm.after_sft == "grpo"
    if arm.after_sft not in ("grpo", "sft"):
        raise ValueError(f"{arm.name}: after_sft must be grpo or sft, got {arm.after_sft!r}")
    lr = scale.rl_lr if grpo else s2.train.min_lr
    batch = scale.rl_prompts if grpo else scale.rl_prompts * scale.rl_group
    train = dataclasses.replace(
        s2.train,
        stage=arm.after_sft,
        max_steps=scale.rl_steps,
        global_batch_size=batch,
        micro_batch_size=batch,
        lr=lr,
        min_lr=lr,
        warmup_steps=0,
        log_every=1,
        rl=RLConfig(
            group_size=scale.rl_group, max_new_tokens=3, temperature=scale.rl_temperature, rewards=["exact_match"]
        ),  # fmt: skip
    )
    s3 = dataclasses.replace(s2, data=dataclasses.replace(s2.data, sources=[count]), train=train)
    return override(s1, sets), override(s2, sets), override(s3, sets)


def run_rl_arm(root: Path, scale: Any, claim: Claim, arm: Arm, seed: int, sets: list[str]) -> dict[str, Any]:
    """Stages 1 and 2 (shared by the arms of one arch and seed), the third stage and the held-out evaluations."""
    from nvlm.repro.run import _key, _quiet, begin_arm, slug, trained
    from nvlm.training.trainer import Trainer

    out = root / claim.name / slug(arm.name) / f"seed{seed}"
    c1, c2, c3 = stage_configs(root, scale, arm, seed, sets)
    key, earlier = begin_arm(out, {"stage1": c1, "stage2": c2, "stage3": c3})
    if earlier is not None:
        return earlier
    t0 = time.perf_counter()
    log, data = _quiet(out / "log.txt"), root / "data"
    if not (data / "test" / "count_wide.jsonl").exists():
        rtasks.generate_count_ood(data, scale.n_test)
    s1 = root / "stage1" / f"{arm.arch}-{_key(c1)}"
    r1 = Trainer(c1, s1, log=log, progress=False).run()
    c2 = dataclasses.replace(c2, model=dataclasses.replace(c2.model, init_from=str(trained(r1, s1))))
    s2 = root / "stage2" / f"{arm.arch}-{_key(c2)}"  # the same stage-2 model for GRPO and more SFT
    final2 = trained(Trainer(c2, s2, log=log, progress=False).run(), s2)
    if not (s2 / "counts.json").exists():
        (s2 / "counts.json").write_text(json.dumps(evaluate_counts(final2, data)))
    start = json.loads((s2 / "counts.json").read_text())
    c3 = dataclasses.replace(c3, model=dataclasses.replace(c3.model, init_from=str(final2)))
    t3 = time.perf_counter()
    r3 = Trainer(c3, out / "stage3", log=log, progress=False).run()
    stage3_s = time.perf_counter() - t3
    after = evaluate_counts(trained(r3, out / "stage3"), data)
    rows = list(read_metrics(out / "stage3" / "metrics.jsonl"))
    result = {
        "claim": claim.name,
        "arm": arm.name,
        "seed": seed,
        "metrics": {**after, **{f"start_{k}": v for k, v in start.items()}},
        "curves": {"stage 3": [r["loss"] for r in rows]},
        "rewards": [r["reward/mean"] for r in rows if "reward/mean" in r],
        "rollout_s": sum(r.get("rollout_s", 0.0) for r in rows),
        "train_s": sum(r.get("train_s", 0.0) for r in rows),
        "stage3_s": stage3_s,
        "wall_s": time.perf_counter() - t0,
        "config": {"stage1": c1.to_dict(), "stage2": c2.to_dict(), "stage3": c3.to_dict()},
        "configs_key": key,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
