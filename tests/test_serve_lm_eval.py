"""The real lm-evaluation-harness against ``nvlm serve`` (the dev extra installs ``lm-eval[api]``; skips without it):
a local multiple-choice task through ``local-completions`` with the server's own tokenizer routes (no
tokenizer folder), scored item by item as ``nvlm eval run`` scores MMLU (the letter's log-probability); and a
local generative task through ``local-chat-completions``, whose answers are the server's own greedy answers.

python -m pytest tests/test_serve_lm_eval.py -q
"""

from __future__ import annotations

import json

import pytest
from serve_util import served

from nvlm.eval.runner import LocalModel, letter_logprobs
from nvlm.eval.scorers.mmlu import letter_from_logprobs, mmlu_prompt

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

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


GEN_TASK = """task: nvlm_gen_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
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


def test_lm_eval_local_chat_completions_answers_as_the_server_does(build_model, tmp_path, monkeypatch):
    """A generative task through ``local-chat-completions --apply_chat_template``: the answers lm-eval records are
    the server's greedy answers to the same chat (asked again here through the OpenAI client), and its
    exact-match score is the one those answers give."""
    from lm_eval.tasks import TaskManager
    from openai import OpenAI

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (2, 2), (5, 1))]
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=data))
    with served(build_model("D"), model_name="tiny") as (url, _):
        out = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={
                "model": "tiny",
                "base_url": url + "/v1/chat/completions",
                "num_concurrent": 2,
                "max_retries": 1,
            },
            tasks=["nvlm_gen_local"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            apply_chat_template=True,
            log_samples=True,
        )
        client = OpenAI(base_url=url + "/v1", api_key="none")
        direct = [
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": it["question"]}],
                max_tokens=8,
                temperature=0,
                stop=["\n"],
            )
            .choices[0]
            .message.content
            for it in items
        ]
    samples = sorted(out["samples"]["nvlm_gen_local"], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]
    assert any(g.strip() for g in got), got  # answers with text in them, not only stops
    assert got == direct  # lm-eval's request shape gets the server's own greedy answer, item by item
    exact = sum(g.strip() == it["answer"] for g, it in zip(got, items, strict=True)) / len(items)
    assert out["results"]["nvlm_gen_local"]["exact_match,none"] == pytest.approx(exact)
