"""The run folder of ``nvlm eval run`` (paper Sec. 6 evaluation): ``OUT/TASK/{predictions.jsonl, run.json}``.

``predictions.jsonl`` grows one flushed line per answered item, so a killed run resumes where it stopped.
``run.json`` records what the predictions were made with: the model, the prompt, ``max_new_tokens`` and a
fingerprint of the data (``Benchmark.fingerprint``). A run with other settings or other data (another shard,
another release) is refused rather than mixed in: predictions are matched to answers by item id, and many
releases number their items by position, so shard 2's answers would silently score shard 1's predictions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nvlm.eval.prompts import PROMPTS

PREDICTIONS, SETTINGS, SUMMARY = "predictions.jsonl", "run.json", "summary.json"
START_OVER = "use another --out, or pass --restart to start over"


class RunError(ValueError):
    """A problem with the run's arguments or its output folder; the message names the file."""


def start_over(folder: Path) -> None:
    """``--restart``: forget the folder's predictions, settings and summary."""
    for name in (PREDICTIONS, SETTINGS, SUMMARY):
        (folder / name).unlink(missing_ok=True)


def read_predictions(path: Path) -> dict[str, dict]:
    """``{id: record}`` of the predictions already made (first wins); a torn last line is cut off the file."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a crash while writing: keep the whole lines only
        raw = raw[: raw.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(raw))
    done: dict[str, dict] = {}
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}:{number}: not valid JSON ({exc.msg}); {START_OVER}") from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("id"), str)
            or not isinstance(rec.get("prediction"), str)
        ):
            raise RunError(f'{path}:{number}: expected {{"id": str, "prediction": str, ...}}')
        done.setdefault(rec["id"], rec)
    return done


def settings(task: str, model: Any, max_new_tokens: int, data: dict, quantize: str | None = None) -> dict:
    prompt = json.dumps(asdict(PROMPTS[task]), sort_keys=True)
    name = str(Path(model).resolve()) if isinstance(model, str | Path) else getattr(model, "name_or_path", None)
    return {
        "task": task,
        "model": name,
        "max_new_tokens": max_new_tokens,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
        "decoding": "greedy",
        "quantize": quantize,
        "data": data,
    }


def check_settings(path: Path, new: dict, resuming: bool) -> None:
    """Refuse to add to predictions made with other settings or data; then record ``new``."""
    if resuming:
        preds = path.parent / PREDICTIONS
        if not path.is_file():
            raise RunError(f"{preds} has no {SETTINGS} beside it saying which model and data made it; {START_OVER}")
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{path}: not readable JSON ({exc}); {START_OVER}") from None
        for key in ("task", "model", "max_new_tokens", "prompt_sha256", "quantize"):
            if None not in (old.get(key), new[key]) and old.get(key) != new[key]:
                raise RunError(
                    f"{preds} holds predictions made with {key} = {old.get(key)!r}, this run has "
                    f"{new[key]!r}: {START_OVER}"
                )
        _check_data(preds, old.get("data"), new["data"])
    path.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")


def _check_data(preds: Path, old: Any, new: dict) -> None:
    if not isinstance(old, dict) or "items_sha256" not in old:
        raise RunError(
            f"{preds} was made before run folders recorded their data, so it may hold another data "
            f"file's predictions; {START_OVER}"
        )
    if old["items_sha256"] != new["items_sha256"]:
        raise RunError(
            f"{preds} was made from other data ({_describe(old)}); this run reads {_describe(new)}. "
            f"Predictions of one dataset would be scored against another's answers: {START_OVER}"
        )


def _describe(data: dict) -> str:
    files = [f.get("path") for f in data.get("files", []) if isinstance(f, dict)]
    more = f" and {len(files) - 1} more files" if len(files) > 1 else ""
    return f"{data.get('items')} items from {files[0] if files else '?'}{more}"
