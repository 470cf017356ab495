"""lmms-eval (``--model openai`` against ``nvlm serve``) next to ``nvlm eval run`` on the same held-out demo
items, as a two-column table.

lmms-eval reads a local task written here (a JSON-lines file of the items, each image as a local path, and a
``utils.py`` that opens it; no hub access), sends the question and the image as a PNG data URL, and scores
the answers with the demo's normalised exact match; ``nvlm eval run --task demo`` answers the same items with
the model in this process.

lmms-eval 0.7.3 goes in its own environment over this one (its pinned filelock and torchvision must not touch
the project's):

    python -m venv --system-site-packages lmmsvenv
    lmmsvenv/bin/pip install --no-deps lmms-eval==0.7.3 && lmmsvenv/bin/pip install loguru jsonlines "filelock<3.19"
    python scripts/lmms_eval_vs_nvlm_eval.py --model runs/demo/nvlm-d/stage2/final \
        --data runs/demo/data/test/color.jsonl --limit 40 --lmms-python lmmsvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from serve_proc import served

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _norm(s):
    return " ".join(s.strip().lower().split()).rstrip(".")


def process_results(doc, results):
    return {"exact_match": float(_norm(results[0]) == _norm(doc["answer"]))}
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def write_task(data: Path, limit: int, folder: Path, name: str) -> list[dict]:
    """The first `limit` records as lmms-eval docs (absolute image path, question without ``<image>``)."""
    root = data.parent.parent  # records name their images relative to the data folder (data/test/x.jsonl)
    docs = []
    for line in data.read_text().splitlines()[:limit]:
        rec = json.loads(line)
        question = rec["conversations"][0]["value"].removeprefix("<image>\n")
        image = str((root / rec["image"]).resolve())
        docs.append({"id": rec["id"], "question": question, "answer": rec["conversations"][1]["value"], "image": image})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=(folder / "items.jsonl").resolve()))
    (folder / "utils.py").write_text(UTILS)
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a saved NVLM folder (nvlm demo's stage2/final)")
    ap.add_argument("--data", required=True, type=Path, help="one of nvlm demo's data/test/*.jsonl")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--lmms-python", default="python", help="the interpreter that has lmms-eval")
    ap.add_argument("--out", type=Path, default=Path("out/lmms-eval-vs-nvlm"))
    ap.add_argument("--port", type=int, default=8018)
    a = ap.parse_args()
    name = f"nvlm_demo_{a.data.stem}"
    docs = write_task(a.data, a.limit, a.out / "tasks", name)

    out = a.out / "nvlm-eval"
    cmd = ["nvlm", "eval", "run", "--model", a.model, "--task", "demo", "--data", str(a.data)]
    run([*cmd, "--limit", str(a.limit), "--out", str(out), "--restart"])
    nvlm_score = float(json.loads((out / "demo" / "summary.json").read_text())["score"]) / 100
    nvlm_preds = [json.loads(x)["prediction"] for x in (out / "demo" / "predictions.jsonl").read_text().splitlines()]

    with served(a.model, a.port, "nvlm-d") as url:
        env = {"OPENAI_API_KEY": "EMPTY", "OPENAI_API_BASE": url + "/v1", "HF_DATASETS_OFFLINE": "1"}
        lmms = [a.lmms_python, "-m", "lmms_eval", "--model", "openai", "--model_args", "model_version=nvlm-d"]
        lmms += ["--include_path", str(a.out / "tasks"), "--tasks", name, "--batch_size", "8", "--log_samples"]
        run([*lmms, "--output_path", str(a.out / "lmms-eval")], env=env)
    results = json.loads(sorted((a.out / "lmms-eval").rglob("*results.json"))[-1].read_text())
    lmms_score = float(results["results"][name]["exact_match,none"])
    samples_file = sorted((a.out / "lmms-eval").rglob(f"*samples_{name}.jsonl"))[-1]
    samples = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    lmms_preds = [s["filtered_resps"] for s in samples]  # 0.7.3 logs the one answer as a string
    same = sum(x.strip() == y.strip() for x, y in zip(lmms_preds, nvlm_preds, strict=True))
    print("\n| task (items) | lmms-eval | nvlm eval run | same answer |\n|---|---|---|---|")
    print(f"| {a.data.stem}, exact match ({len(docs)}) | {lmms_score:.4f} | {nvlm_score:.4f} | {same}/{len(docs)} |")
    sys.exit(0 if abs(lmms_score - nvlm_score) < 1e-6 else 1)


if __name__ == "__main__":
    main()
