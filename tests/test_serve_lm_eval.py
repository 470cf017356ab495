"""The real lm-evaluation-harness against ``nvlm serve`` (the dev extra installs ``lm-eval[api]``; skips without it):
a local multiple-choice task through ``local-completions`` with the server's own tokenizer routes (no
tokenizer folder), scored item by item as ``nvlm eval run`` scores MMLU (the letter's log-probability).

python -m pytest tests/test_serve_lm_eval.py -q
"""

from __future__ import annotations

import json

import pytest
from serve_util import served

from nvlm.eval.runner import LocalModel, letter_logprobs
from nvlm.eval.scorers.mmlu import letter_from_logprobs, mmlu_prompt

lm_eval = pytest.importorskip("lm_eval")

TASK = """task: nvlm_mc_local
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


def _items() -> list[dict]:
    dev = [(f"What is {a} plus 1?", [str(a + d) for d in (1, 0, 2, 3)], 0) for a in (2, 5)]
    out = []
    for a in range(8):
        choices = [str(a + d) for d in (0, 1, 2, 3)]
        choices = choices[a % 4 :] + choices[: a % 4]  # the answer moves around
        prompt = mmlu_prompt("arithmetic", dev, f"What is {a} plus 0?", choices, k=2)
        out.append({"prompt": prompt, "answer": choices.index(str(a))})
    return out


def test_lm_eval_local_completions_equals_nvlm_eval(build_model, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = _items()
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    built = build_model("D")
    want = [
        letter_from_logprobs(lp)
        for lp in letter_logprobs(LocalModel(*built), [it["prompt"] for it in items], ["ABCD"] * 8)
    ]
    with served(built, model_name="tiny") as (url, _):
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "tiny", "base_url": url + "/v1/completions", "num_concurrent": 1, "max_retries": 1},
            tasks=["nvlm_mc_local"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
    samples = sorted(out["samples"]["nvlm_mc_local"], key=lambda s: s["doc_id"])
    got = ["ABCD"[max(range(4), key=lambda i: s["filtered_resps"][i][0])] for s in samples]
    assert got == want  # item by item, the same letters as nvlm eval's log-probability scoring
    acc = sum(w == "ABCD"[it["answer"]] for w, it in zip(want, items, strict=True)) / len(items)
    assert out["results"]["nvlm_mc_local"]["acc,none"] == pytest.approx(acc)
