"""Run metrics: ``metrics.jsonl`` (one line per step), TensorBoard scalars, and a loss-curve PNG (matplotlib)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends per-step metrics to ``metrics.jsonl`` and TensorBoard (``tb/``) in the run folder."""

    def __init__(self, out: Path, tensorboard: bool = True) -> None:
        self.path = out / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is a dependency; tolerate a stripped environment
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume, forget lines written after the checkpoint we resume from (they will be redone)."""
        if self.path.exists():
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def smooth(values: list[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard draws it); non-finite values skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            n += 1
            avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha**n) if n else math.nan)
    return out


def plot_curves(curves: dict[str, list[float]], path: Path, title: str = "training loss") -> None:
    """Loss curves → PNG with matplotlib (the ``plot`` extra): one panel per curve (stage), the raw loss per
    logged step (thin) and its smoothed trend (thick), labelled axes with ticks. Without matplotlib: one line
    on stderr saying how to install it, and no PNG (a training run never fails for a missing figure)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {Path(path).name}: matplotlib is not installed; pip install 'nvlm[plot]'", file=sys.stderr)
        return
    names = list(curves) or ["(no curves)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        ys = curves.get(name, [])
        xs = range(1, len(ys) + 1)
        ax.plot(xs, ys, color="C0", alpha=0.35, linewidth=0.8, label="raw")
        ax.plot(xs, smooth(ys), color="C0", linewidth=1.8, label="smoothed (EMA 0.9)")
        ax.set_title(name)
        ax.set_xlabel("logged step (every train.log_every steps)")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        if ys:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
