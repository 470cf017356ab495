"""lm-evaluation-harness against ``nvlm serve`` next to ``nvlm eval run`` on the same items, as a two-column table.

Two tasks from ``nvlm demo``'s held-out sums (``data/test/add.jsonl``, text only):

* multiple choice: each sum as an MMLU question (the answer and three near misses as A-D, 5-shot from the
  first five sums), written as MMLU's CSV release; ``nvlm eval run --task mmlu`` takes the letter with the
  highest log-probability, lm-eval's ``local-completions`` the choice with the highest log-likelihood, through
  ``/v1/completions`` and the server's tokenizer routes (no tokenizer folder), on the very same prompts;
* generative: each sum as a chat question, ``nvlm eval run --task demo`` (greedy, 4 tokens) and lm-eval's
  ``local-chat-completions`` (greedy, 4 tokens, normalised exact match as the demo scores).

python scripts/lm_eval_vs_nvlm_eval.py --model runs/demo/nvlm-d/stage2/final --data runs/demo/data/test/add.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from serve_proc import served

MC_TASK = """task: nvlm_demo_add_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""

GEN_TASK = """task: nvlm_demo_add_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$", "\\\\.+$"]
"""


def sums(path: Path) -> list[tuple[str, str]]:
    """(question, answer) of each held-out record."""
    out = []
    for line in path.read_text().splitlines():
        conv = json.loads(line)["conversations"]
        out.append((conv[0]["value"], conv[1]["value"]))
    return out


def write_mmlu(items: list[tuple[str, str]], root: Path) -> None:
    """MMLU's CSV layout (question, A, B, C, D, answer letter); the answer's place moves from item to item."""
    for split, rows in (("dev", items[:5]), ("test", items[5:])):
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"demo_add_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            for i, (question, answer) in enumerate(rows):
                n = int(answer)
                choices = [str(n + d) for d in (0, 1, 2, 3)] if n < 9 else [str(n - d) for d in (0, 1, 2, 3)]
                choices = choices[i % 4 :] + choices[: i % 4]
                writer.writerow([question, *choices, "ABCD"[choices.index(answer)]])


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def nvlm_eval(model: str, task: str, data: Path, out: Path) -> tuple[float, list[str], list[list[float]]]:
    """The score (0-1), the predictions in item order and (multiple choice) the letters' log-probabilities."""
    run(["nvlm", "eval", "run", "--model", model, "--task", task, "--data", str(data), "--out", str(out), "--restart"])
    summary = json.loads((out / task / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / task / "predictions.jsonl").read_text().splitlines()]
    lps = [[r["logprobs"][x] for x in "ABCD"] for r in rows if "logprobs" in r]
    return float(summary["score"]) / 100, [r["prediction"] for r in rows], lps


def lm_eval(
    kind: str, url: str, task: str, tasks: Path, out: Path, extra: list[str]
) -> tuple[float, list[str], list[list[float]]]:
    """The score and, per item in order, the chosen letter and the choices' log-likelihoods (multiple choice) or
    the answer text."""
    path = "completions" if kind == "local-completions" else "chat/completions"
    args = f"model=nvlm-d,base_url={url}/v1/{path},num_concurrent=1,max_retries=3"
    cmd = ["lm-eval", "run", "--model", kind, "--model_args", args, "--include_path", str(tasks), "--log_samples"]
    run([*cmd, *extra, "--tasks", task, "--output_path", str(out)], env={"HF_DATASETS_OFFLINE": "1"})
    metrics = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"][task]
    samples = [json.loads(line) for line in sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1].read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    if "acc,none" in metrics:  # filtered_resps: per choice [log-likelihood, is_greedy], logged as strings
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        picks = ["ABCD"[max(range(4), key=lambda i: ll[i])] for ll in lls]
        return float(metrics["acc,none"]), picks, lls
    return float(metrics["exact_match,none"]), [s["resps"][0][0] for s in samples], []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a saved NVLM folder (nvlm demo's stage2/final)")
    ap.add_argument("--data", required=True, type=Path, help="nvlm demo's data/test/add.jsonl")
    ap.add_argument("--out", type=Path, default=Path("out/lm-eval-vs-nvlm"))
    ap.add_argument("--port", type=int, default=8017)
    a = ap.parse_args()
    items = sums(a.data)
    tasks = a.out / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    write_mmlu(items, a.out / "mmlu")

    from nvlm.eval.readers_text import read_mmlu
    from nvlm.eval.runner import render

    mc = [
        {"prompt": render(it.prompt), "answer": "ABCD".index(it.fields["answers"][0])}
        for it in read_mmlu([a.out / "mmlu"])
    ]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=(tasks / "mc.jsonl").resolve()))
    gen = [{"question": q, "answer": ans} for q, ans in items]
    (tasks / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=(tasks / "gen.jsonl").resolve()))

    (nvlm_mc, nvlm_mc_preds, nvlm_lps) = nvlm_eval(a.model, "mmlu", a.out / "mmlu", a.out / "nvlm-eval")
    (nvlm_gen, nvlm_gen_preds, _) = nvlm_eval(a.model, "demo", a.data, a.out / "nvlm-eval")
    with served(a.model, a.port, "nvlm-d") as url:
        (lm_mc, lm_mc_preds, lm_lls) = lm_eval(
            "local-completions", url, "nvlm_demo_add_mc", tasks, a.out / "lm-eval-mc", []
        )
        chat = ["--apply_chat_template"]
        (lm_gen, lm_gen_preds, _) = lm_eval(
            "local-chat-completions", url, "nvlm_demo_add_gen", tasks, a.out / "lm-eval-gen", chat
        )
    same_mc = sum(x == y for x, y in zip(lm_mc_preds, nvlm_mc_preds, strict=True))
    same_gen = sum(x.strip() == y.strip() for x, y in zip(lm_gen_preds, nvlm_gen_preds, strict=True))
    print("\n| task (items) | lm-eval | nvlm eval run | same answer |\n|---|---|---|---|")
    print(f"| multiple choice, by log-likelihood ({len(mc)}) | {lm_mc:.4f} | {nvlm_mc:.4f} | {same_mc}/{len(mc)} |")
    print(f"| generative, exact match ({len(gen)}) | {lm_gen:.4f} | {nvlm_gen:.4f} | {same_gen}/{len(gen)} |")
    gap = max(abs(x - y) for xs, ys in zip(lm_lls, nvlm_lps, strict=True) for x, y in zip(xs, ys, strict=True))
    print(f"largest gap between the two log-likelihoods of a choice: {gap:.2e}")
    agree = abs(lm_mc - nvlm_mc) < 1e-6 and abs(lm_gen - nvlm_gen) < 1e-6
    sys.exit(0 if agree and same_mc == len(mc) and same_gen == len(gen) else 1)


if __name__ == "__main__":
    main()
