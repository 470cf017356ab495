"""Figures of ``nvlm repro`` (matplotlib, the optional ``plot`` extra): per claim, bars of the verdict metric
with every seed's value as a point and min–max error bars; where the claim is about fitting (the resampler),
the training-loss curves too, one panel per stage, raw (thin) and smoothed (thick)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvlm.training.metrics import smooth

INSTALL = "no plot: matplotlib is not installed; pip install 'nvlm[plot]'"


def pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def claim_figure(summary: dict[str, Any], path: Path, curves: bool = False) -> bool:
    """Bars (+ loss curves) of one claim → PNG at `path`. False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    metric, arms = summary["metric"], summary["arms"]
    panels = 3 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    names = list(arms)
    for i, name in enumerate(names):
        s = arms[name].get(metric)
        if not s or not s["n"]:
            continue
        ax.bar(i, s["mean"], color=f"C{i}", alpha=0.6)
        ax.errorbar(i, s["mean"], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], color="black", capsize=4)
        ax.scatter([i] * s["n"], s["values"], color="black", s=14, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{summary['name']}: {summary['verdict']}")
    ax.grid(axis="y", alpha=0.3)
    if curves:
        for k, stage in enumerate(("stage 1", "stage 2"), 1):
            cax = axes[0][k]
            for i, name in enumerate(names):
                for j, run in enumerate(r for r in summary["runs"] if r.get("arm") == name):
                    ys = run["curves"][stage]
                    train = run["config"][f"stage{k}"]["train"]  # metrics.jsonl: a row every log_every steps
                    xs = [min(train["log_every"] * (n + 1), train["max_steps"]) for n in range(len(ys))]
                    cax.plot(xs, ys, color=f"C{i}", alpha=0.25, linewidth=0.7)
                    cax.plot(xs, smooth(ys), color=f"C{i}", linewidth=1.6, label=name if j == 0 else None)
            cax.set_xlabel("training step")
            cax.set_ylabel("training loss (nats / token)")
            cax.set_title(f"{stage}: raw (thin) and smoothed (thick)")
            cax.grid(alpha=0.3)
            cax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
