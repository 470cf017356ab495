"""``results.json`` and ``REPORT.md`` of ``nvlm repro``: per claim the paper's claim and numbers, ours (mean,
spread and every seed) and the verdict computed by :mod:`nvlm.repro.stats` from those numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nvlm.repro import stats
from nvlm.repro.claims import Claim

METRICS = {
    "vl_accuracy": "held-out accuracy (exact match, mean over the claim's tasks)",
    "char_accuracy": "held-out per-character accuracy (mean over the claim's tasks; 1-character answers: exact)",
    "text_accuracy": "held-out text-only accuracy (single-digit addition, 20 unseen pairs)",
    "final_loss": "stage-2 training loss (mean of the last 10 % of steps)",
    "samples_per_s": "training samples/s (median step, interleaved D/X/H)",
    "count_accuracy": "held-out count accuracy (1-5 shapes, as trained; exact match)",
    "wide_accuracy": "count accuracy on 8-9 tile canvases, larger than any training image",
    "many_accuracy": "count accuracy on 6-7 shapes, more than any training answer",
    "start_count_accuracy": "the stage-2 model's held-out count accuracy (where the third stage starts)",
}


def per_arm(claim: Claim, runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{arm: {metric: [value per seed, in seed order]}}."""
    out: dict[str, dict[str, list[float]]] = {a.name: {} for a in claim.arms}
    for run in sorted(runs, key=lambda r: r["seed"]):
        if "per_arm" in run:  # the speed claim: all arms timed in one run per seed
            items = [(a, m) for a, m in run["per_arm"].items()]
        else:
            items = [(run["arm"], run["metrics"])]
        for arm, metrics in items:
            for k, v in metrics.items():
                if v is not None:
                    out.setdefault(arm, {}).setdefault(k, []).append(float(v))
    return out


def chance(metric: str, tasks: tuple[str, ...]) -> float | None:
    """A uniform guess's value of `metric` on the claim's tasks (None: the metric has no chance level)."""
    from nvlm.demo.synthetic import TASKS as DEMO_TASKS
    from nvlm.demo.synthetic import TEXT_TASKS
    from nvlm.repro.tasks import COUNT_OOD, TASKS

    if metric in ("text_accuracy", "text_backbone_accuracy"):
        return TEXT_TASKS["add"].chance
    if metric in ("count_accuracy", "start_count_accuracy"):
        return DEMO_TASKS["count"].chance
    if metric in ("wide_accuracy", "many_accuracy"):
        return COUNT_OOD[f"count_{metric.split('_')[0]}"][2]
    if metric == "char_accuracy" and tasks:
        return sum(TASKS[t].char_chance for t in tasks) / len(tasks)
    if metric == "vl_accuracy" and tasks:
        return sum(TASKS[t].chance for t in tasks) / len(tasks)
    return None


def check_validity(claim: Claim, values: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The claim's validity check on the measured values: passed, and the numbers it was judged by."""
    v = claim.validity
    if v is None:
        return {"check": "timing: interleaved rounds pair the arms", "passed": True}
    level = chance(v.metric, claim.tasks)
    if level is None:
        raise ValueError(f"{claim.name}: validity metric {v.metric!r} has no chance level")
    seen = values.get(v.arm, {}).get(v.metric, [])
    mean = sum(seen) / len(seen) if seen else None
    need = v.factor * level
    return {
        "check": f"{v.arm}: mean {v.metric} ≥ {v.factor:g} × chance ({need:.3f})",
        "arm": v.arm,
        "metric": v.metric,
        "chance": level,
        "needed": need,
        "measured": mean,
        "passed": mean is not None and mean >= need,
    }


def summarise(claim: Claim, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The claim's arms (values and spread per metric), validity, comparisons and verdict, all from `runs`."""
    values = per_arm(claim, runs)
    comps = []
    for a, b, metric in claim.comparisons:
        if claim.timing:
            rounds = [r["rounds"] for r in sorted(runs, key=lambda r: r["seed"]) if "rounds" in r]
            xs = [v for r in rounds for v in r[a]]
            ys = [v for r in rounds for v in r[b]]
            judged = stats.compare_rounds(xs, ys)
        else:
            judged = stats.compare(values[a].get(metric, []), values[b].get(metric, []))
        comps.append({"a": a, "b": b, "metric": metric, **judged})
    validity = check_validity(claim, values)
    return {
        "name": claim.name,
        "title": claim.title,
        "claim": claim.claim,
        "mechanism": claim.mechanism,
        "metric": claim.metric,
        "arms": {
            arm: {m: {"values": vs, **stats.spread(vs)} for m, vs in metrics.items()} for arm, metrics in values.items()
        },
        "validity": validity,
        "comparisons": comps,
        "verdict": stats.verdict([c["verdict"] for c in comps], validity["passed"]),
        "rule": stats.RULE,
        "wall_s": sum(r["wall_s"] for r in runs),
        "runs": runs,
    }


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def effect(c: dict[str, Any]) -> str:
    """A comparison's effect and 95 % interval, as the report prints it."""
    if c["effect"] is None:
        return "no values"
    if c["kind"] == "ratio":
        shown = f"ratio {c['effect']:.3f}"
    else:
        shown = f"difference {c['effect']:+.3f}"
    if c["low"] is None:
        return shown + " (< 2 seeds or rounds: no interval)"
    return shown + f" [95 % interval {c['low']:.3f}, {c['high']:.3f}]"


def section(summary: dict[str, Any], claim: Claim, plot: str | None) -> str:
    """The REPORT.md section of one claim."""
    metric = summary["metric"]
    shown = [metric] + sorted({c["metric"] for c in summary["comparisons"]} - {metric})
    if summary["name"] == "text-sft":
        shown.append("text_backbone_accuracy")
    if summary["name"] == "rl-vs-sft":
        shown += ["many_accuracy", "start_count_accuracy"]
    lines = [f"## {summary['title']}", "", f"**Paper:** {summary['claim']}.", "", claim.paper, ""]
    lines += ["**Ours** (mean ± sample std over seeds, [min, max], per-seed values):", ""]
    lines += ["| arm | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for arm, metrics in summary["arms"].items():
        cells = []
        for m in shown:
            s = metrics.get(m)
            if not s or s["n"] == 0:
                cells.append("—")
                continue
            seeds = ", ".join(f"{v:.3f}" for v in s["values"])
            cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} [{_fmt(s['min'])}, {_fmt(s['max'])}] ({seeds})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Metrics: " + "; ".join(f"`{m}` = {METRICS.get(m, m)}" for m in shown) + ".", ""]
    lines += [f"**Why this task tests the mechanism:** {summary['mechanism']}.", ""]
    v = summary["validity"]
    result = "passed" if v["passed"] else "**failed**: no verdict"
    seen = f" (measured {_fmt(v['measured'])})" if "measured" in v else ""
    lines += [f"**Validity check:** {v['check']}{seen}: {result}.", ""]
    for c in summary["comparisons"]:
        lines.append(f"- {c['a']} > {c['b']} on `{c['metric']}`: {effect(c)}: **{c['verdict']}**")
    lines += ["", f"**Verdict: {summary['verdict']}** (computed; rule: {summary['rule']}).", ""]
    lines.append(f"Wall time of its runs: {summary['wall_s']:.0f} s.")
    if plot:
        lines += ["", f"![{summary['name']}]({plot})"]
    return "\n".join(lines) + "\n"


def write(out: Path, summaries: dict[str, dict[str, Any]], sections: dict[str, str], header: str) -> None:
    """Merge `summaries` into ``results.json`` and rewrite ``REPORT.md`` from every claim it holds."""
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {"claims": {}}
    data["claims"].update(summaries)
    path.write_text(json.dumps(data, indent=2))
    sec_path = out / "sections"
    sec_path.mkdir(exist_ok=True)
    for name, text in sections.items():
        (sec_path / f"{name}.md").write_text(text)
    table = [
        "| claim | validity check | effect (95 % interval) | verdict | seeds | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for s in data["claims"].values():
        seeds = len({r["seed"] for r in s["runs"]})
        v = s["validity"]
        check = v["check"] + ("" if "measured" not in v else f": {_fmt(v['measured'])}")
        check += "" if v["passed"] else " (failed)"
        effects = "; ".join(f"{c['a']} vs {c['b']}: {effect(c)}" for c in s["comparisons"])
        table.append(f"| {s['title']} | {check} | {effects} | **{s['verdict']}** | {seeds} | {s['wall_s']:.0f} |")
    body = [header, "", *table, "", f"Verdict rule: {stats.RULE}.", ""]
    body += [(sec_path / f"{n}.md").read_text() for n in data["claims"] if (sec_path / f"{n}.md").exists()]
    (out / "REPORT.md").write_text("\n".join(body))
