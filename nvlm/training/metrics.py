"""Run metrics: ``metrics.jsonl`` (one line per step), TensorBoard scalars, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


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


def plot_curves(curves: dict[str, list[float]], path: Path, title: str = "training loss") -> None:
    """A small line chart of one or more loss curves, drawn with Pillow (no plotting dependency)."""
    w, h, pad = 640, 360, 48
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    values = [v for c in curves.values() for v in c if math.isfinite(v)]
    if not values:
        d.text((pad, h // 2), "no finite values", fill="black")
        im.save(path)
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    d.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    d.text((pad, 4), title, fill="black")
    d.text((4, pad // 2), f"{hi:.3g}", fill="black")
    d.text((4, h - pad - 10), f"{lo:.3g}", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    n_max = max(len(c) for c in curves.values())
    for k, (name, c) in enumerate(curves.items()):
        pts = [
            (pad + (w - 1.5 * pad) * i / max(1, n_max - 1), h - pad - (h - 1.5 * pad) * (v - lo) / (hi - lo))
            for i, v in enumerate(c)
            if math.isfinite(v)
        ]
        if len(pts) > 1:
            d.line(pts, fill=colors[k % len(colors)], width=2)
        d.text((w - 200, pad // 2 + 4 + 14 * k), name, fill=colors[k % len(colors)])
    d.text((w // 2 - 20, h - pad + 8), f"step (0–{n_max})", fill="black")
    im.save(path)
