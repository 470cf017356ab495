"""Running one claim's arms × seeds on the demo's two-stage recipe (``nvlm.demo.pipeline.stage_config``).

Every arm's run config is the demo's stage config with the arm's changes applied (model overrides, the stage-2
sources, ``train.freeze_llm``) and then the user's ``--set key=value`` overrides, so fixes to the demo recipe
reach every arm and a GPU user scales up through the same keys. The data and the backbone stand-ins (tokenizer,
text LLM, vision tower) are made once per output folder and shared by all claims, arms and seeds; seeds vary
the training (initialisation of the new modules, data order). Each finished arm × seed writes ``result.json``;
a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvlm.demo import synthetic
from nvlm.demo.backbone import build_tokenizer, pretrain_llm, save_vision
from nvlm.demo.pipeline import TEXT_MIX, Budget, evaluate, stage_config
from nvlm.repro import tasks as rtasks
from nvlm.repro.claims import Arm, Claim
from nvlm.training.config import RunConfig, override
from nvlm.training.metrics import read_metrics


@dataclass(frozen=True)
class Scale:
    """Data sizes and step counts of one repro run. Calibration (2-core CPU shared with other jobs, load ~11, so
    measured in CPU seconds at 1 thread): one default tags arm (NVLM-D, 1-D tags) at 60 + 300 steps took 87 CPU s
    (430 s wall under that load); 60 + 180 steps keep the 15 tags runs (5 arms × 3 seeds) near 15 minutes."""

    name: str
    n_train: int  # training images per repro task
    n_test: int  # held-out images per repro task
    demo_n_train: int  # images per demo task (the stage-1 recipe's caption and task data)
    text_steps: int  # text LLM pretraining steps
    stage1_steps: int
    stage2_steps: int
    batch: int = 32
    bench_steps: int = 5  # speed claim: timed steps per arch
    bench_warmup: int = 2
    bench: dict[str, Any] = field(default_factory=dict)  # other `nvlm bench train` Shape fields (tests: tiny)
    # rl-vs-sft (nvlm.repro.rl): its stages 1 and 2 are the quick demo's (at the stage budgets above, a first
    # default run's stage-2 model counted at chance, 0.18), then the third stage: steps, images a step, GRPO's
    # group size, lr and temperature
    rl_stage1_steps: int = 80
    rl_stage2_steps: int = 480
    rl_stage_batch: int = 32
    rl_steps: int = 40
    rl_prompts: int = 8
    rl_group: int = 8
    rl_lr: float = 5e-5
    rl_temperature: float = 1.0

    def budget(self) -> Budget:
        return Budget(self.demo_n_train, self.n_test, self.text_steps, self.stage1_steps, self.stage2_steps, self.batch)


SCALES = {
    "quick": Scale(
        "quick",
        300,
        40,
        100,
        120,
        10,
        30,
        batch=16,
        bench_steps=3,
        bench_warmup=1,
        rl_stage1_steps=10,
        rl_stage2_steps=30,
        rl_stage_batch=16,
        rl_steps=2,
    ),  # fmt: skip
    "default": Scale("default", 2000, 100, 300, 300, 60, 180, batch=16, bench_steps=15),
}


def _quiet(path: Path):
    def log(*args: Any, **_: Any) -> None:
        with open(path, "a") as f:
            f.write(" ".join(str(a) for a in args) + "\n")

    return log


def prepare(root: Path, scale: Scale, log=print) -> dict[str, Any]:
    """Data and backbone stand-ins under `root` (once; later calls read ``backbones/done.json``)."""
    done = root / "backbones" / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    data = root / "data"
    synthetic.generate(data, scale.demo_n_train, scale.n_test, seed=0)
    counts = rtasks.generate(data, tuple(rtasks.TASKS), scale.n_train, scale.n_test, seed=0)
    tokenizer = build_tokenizer(data)  # its corpus is every train/*.jsonl: the repro tasks' words included
    quiet = _quiet(root / "backbones.log")
    # the demo's text mix (addition, scene Q&A and, where the recipe has it, caption writing); the caption share
    # is split between the demo's captions and the repro tasks' text-only captions
    sources = [(data / "train" / f"{n}.jsonl", w) for n, w in zip(("add", "text_scene"), TEXT_MIX[:2])]
    if len(TEXT_MIX) > 2:
        share = TEXT_MIX[2] / (1 + len(rtasks.TASKS))
        sources.append((data / "train" / "text_caption.jsonl", share))
        sources += [(data / "train" / f"{t}_text_caption.jsonl", share) for t in rtasks.TASKS]
    text = pretrain_llm(root / "backbones" / "llm", tokenizer, sources, scale.text_steps, seed=0, log=quiet)
    save_vision(root / "backbones" / "vision", 0)
    import nvlm

    backbone = nvlm.build("D", llm=str(root / "backbones" / "llm"), vision=str(root / "backbones" / "vision"))
    text_acc = evaluate(backbone, data, ("add",))["add"]["accuracy"]  # D without images = the backbone exactly
    info = {"counts": counts, "text_backbone_accuracy": text_acc, "text_llm_wall_s": text["wall_s"]}
    info["wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(info, indent=2))
    log(f"data and backbones in {info['wall_s']:.0f} s (backbone text accuracy {text_acc:.3f}) → {root}")
    return info


def _src(root: Path, name: str, weight: float) -> dict[str, Any]:
    return {"path": str(root / "data" / "train" / f"{name}.jsonl"), "weight": weight, "image_root": str(root / "data")}


def arm_configs(
    root: Path, scale: Scale, claim: Claim, arm: Arm, seed: int, sets: list[str]
) -> tuple[RunConfig, RunConfig]:
    """Stage 1 and stage 2 run configs of one arm (stage 2's init_from is filled in by `run_arm`)."""
    budget = scale.budget()
    s1 = stage_config(arm.arch, "pretrain", root, budget, seed=seed)
    model1 = dataclasses.replace(s1.model, overrides={**s1.model.overrides, **arm.model})
    # stage 1: the recipe's caption + task sources, and as much weight again on the claim's tasks and captions;
    # captions only (LLaVA-1.5's kind of pretraining data): the recipe's captions and the claim's task captions
    extra = sum(s["weight"] for s in s1.data.sources) / (2 * len(claim.tasks))
    mine = [_src(root, f"{t}{c}", extra) for t in claim.tasks for c in ("", "_caption")]
    sources1 = s1.data.sources + mine
    if arm.stage1_data == "captions":
        sources1 = [s for s in sources1 if Path(s["path"]).stem.endswith("caption")]
    elif arm.stage1_data != "diverse":
        raise ValueError(f"unknown stage1_data {arm.stage1_data!r}: diverse or captions")
    s1 = dataclasses.replace(s1, model=model1, data=dataclasses.replace(s1.data, sources=sources1))
    s2 = stage_config(arm.arch, "sft", root, budget, seed=seed)
    text = [s for s in s2.data.sources if Path(s["path"]).stem in ("add", "text_scene")]
    text_total = sum(s["weight"] for s in text)
    srcs = [_src(root, t, (1 - arm.text_share) / len(claim.tasks)) for t in claim.tasks]
    if arm.text_share > 0:  # the recipe's text-only sources, rescaled to the arm's share
        srcs += [{**s, "weight": s["weight"] * arm.text_share / text_total} for s in text]
    s2 = dataclasses.replace(
        s2,
        model=dataclasses.replace(s2.model, overrides={**s2.model.overrides, **arm.model}),
        data=dataclasses.replace(s2.data, sources=srcs),
        train=dataclasses.replace(s2.train, freeze_llm=arm.freeze_llm),
    )
    if claim.max_seq_len is not None:
        s1, s2 = (
            dataclasses.replace(c, data=dataclasses.replace(c.data, max_seq_len=claim.max_seq_len)) for c in (s1, s2)
        )
    return override(s1, sets), override(s2, sets)


def _key(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


class Interrupted(Exception):
    """A stage was stopped by a signal (its checkpoint saved): the repro run stops; the same command resumes it."""


def trained(result: Any, where: Path) -> Path:
    """The final checkpoint of a finished stage; Interrupted when a signal stopped it first."""
    if result.interrupted or result.final_dir is None:
        raise Interrupted(f"stopped by a signal in {where}; the same command resumes it (finished arms are kept)")
    return Path(result.final_dir)


def configs_key(configs: dict[str, RunConfig]) -> str:
    """What an arm's result is made from: its stages' run configs (before the runs fill in init_from)."""
    return hashlib.sha256(json.dumps({k: c.to_dict() for k, c in configs.items()}, sort_keys=True).encode()).hexdigest()


def begin_arm(out: Path, configs: dict[str, RunConfig]) -> tuple[str, dict[str, Any] | None]:
    """(the key of an arm's stage configs, its earlier result made from them or None); an arm that runs gets its
    folder, marked with the key."""
    key = configs_key(configs)
    earlier = earlier_result(out, key)
    if earlier is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "configs_key").write_text(key)
    return key, earlier


def earlier_result(out: Path, key: str) -> dict[str, Any] | None:
    """An arm's earlier result when it was made from the same configs. A result of other configs (an edited claim,
    other --set values, an older nvlm) is set aside as ``seedN.old-<its key>``, kept, and the arm runs again."""
    path = out / "result.json"
    if not path.exists():
        if out.exists():  # an unfinished arm: its stages resume only if they were made from the same configs
            if (out / "configs_key").exists() and (out / "configs_key").read_text() != key:
                out.rename(out.with_name(f"{out.name}.old-{(out / 'configs_key').read_text()[:10]}"))
        return None
    old = json.loads(path.read_text())
    if old.get("configs_key") == key:
        return old
    out.rename(out.with_name(f"{out.name}.old-{str(old.get('configs_key', 'unkeyed'))[:10]}"))
    return None


def eval_tasks(loaded: Any, data: Path, names: tuple[str, ...], batch_size: int = 50) -> dict[str, Any]:
    """Greedy answers of (model, processor) on every held-out item → exact-match and per-character accuracy per
    task."""
    from nvlm.data.chat import render_chat
    from nvlm.data.formats import read_records

    model, processor = loaded
    model.eval()
    out = {}
    for name in names:
        convs = list(read_records(data / "test" / f"{name}.jsonl", image_root=data))
        exact = chars = 0.0
        for i in range(0, len(convs), batch_size):
            chunk = convs[i : i + batch_size]
            prompts = [render_chat(c.messages[:-1]) for c in chunk]
            images = [c.images for c in chunk]
            answers = model.generate(processor, prompts, images, max_new_tokens=rtasks.TASKS[name].max_new_tokens)
            for a, c in zip(answers, chunk):
                truth, pred = rtasks.normalise(c.messages[-1]["content"]), rtasks.normalise(a)
                exact += pred == truth
                chars += sum(p == t for p, t in zip(pred, truth)) / len(truth)
        n = len(convs)
        out[name] = {"accuracy": exact / n, "char_accuracy": chars / n, "chance": rtasks.TASKS[name].chance, "n": n}
    return out


def slug(name: str) -> str:
    """An arm's name as a folder name."""
    return name.replace(" ", "_").replace(",", "").replace("%", "pct").replace("(", "").replace(")", "")


def run_arm(
    root: Path, scale: Scale, claim: Claim, arm: Arm, seed: int, sets: list[str], backbone_text: float
) -> dict[str, Any]:
    """Stage 1 (shared by arms whose stage-1 config is equal), stage 2 and the held-out evaluation."""
    import nvlm
    from nvlm.training.trainer import Trainer

    out = root / claim.name / slug(arm.name) / f"seed{seed}"
    c1, c2 = arm_configs(root, scale, claim, arm, seed, sets)
    key, earlier = begin_arm(out, {"stage1": c1, "stage2": c2})
    if earlier is not None:
        return earlier
    t0 = time.perf_counter()
    log = _quiet(out / "log.txt")
    s1 = root / "stage1" / f"{arm.arch}-{_key(c1)}"  # arms with equal stage-1 configs share it
    r1 = Trainer(c1, s1, log=log, progress=False).run()
    c2 = dataclasses.replace(c2, model=dataclasses.replace(c2.model, init_from=str(trained(r1, s1))))
    r2 = Trainer(c2, out / "stage2", log=log, progress=False).run()
    loaded = nvlm.load(trained(r2, out / "stage2"))
    per_task = eval_tasks(loaded, root / "data", claim.tasks)
    text = evaluate(loaded, root / "data", ("add",))["add"]["accuracy"]
    curves = {"stage 1": [r["loss"] for r in read_metrics(s1 / "metrics.jsonl")]}
    curves["stage 2"] = [r["loss"] for r in read_metrics(out / "stage2" / "metrics.jsonl")]
    tail = curves["stage 2"][-max(1, len(curves["stage 2"]) // 10) :]
    result = {
        "claim": claim.name,
        "arm": arm.name,
        "seed": seed,
        "metrics": {
            "vl_accuracy": sum(t["accuracy"] for t in per_task.values()) / len(per_task),
            "char_accuracy": sum(t["char_accuracy"] for t in per_task.values()) / len(per_task),
            "text_accuracy": text,
            "text_backbone_accuracy": backbone_text,
            "final_loss": sum(tail) / len(tail),
        },
        "tasks": per_task,
        "curves": curves,
        "samples_per_s": {"stage1": r1.samples_per_s, "stage2": r2.samples_per_s},
        "wall_s": time.perf_counter() - t0,
        "config": {"stage1": c1.to_dict(), "stage2": c2.to_dict()},
        "configs_key": key,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_speed(root: Path, scale: Scale, claim: Claim, seed: int, device: str | None) -> dict[str, Any]:
    """One seed of ``nvlm bench train``'s D/X/H timing at equal shapes (its CPU or GPU preset)."""
    import torch

    from nvlm.bench.train import resolve_shape
    from nvlm.bench.train import run as bench

    out = root / claim.name / f"seed{seed}"
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    t0 = time.perf_counter()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = "gpu-1b" if dev == "cuda" else "cpu"
    shape = resolve_shape(preset, steps=scale.bench_steps, warmup=scale.bench_warmup, **scale.bench)
    res = bench([a.arch for a in claim.arms], shape, device=dev, seed=seed)
    result = {
        "claim": claim.name,
        "seed": seed,
        "per_arm": {a: {"samples_per_s": r["samples_per_s"]} for a, r in res["archs"].items()},
        # one timed step per arch per round, interleaved D, X, H, D, …: the rounds pair the arms
        "rounds": {a: [shape.batch_size / t for t in r["step_s_all"]] for a, r in res["archs"].items()},
        "bench": res,
        "wall_s": time.perf_counter() - t0,
        "config": {"preset": preset, "device": dev, "shape": res["settings"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
