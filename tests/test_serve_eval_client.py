"""``nvlm.serve.client.ServerModel``: the eval runner's ``model.generate`` over any OpenAI-compatible server;
answers through our server equal ``model.generate`` on the same prompts.

python -m pytest tests/test_serve_eval_client.py -q
"""

from __future__ import annotations

import pytest
from conftest import picture
from serve_util import served

from nvlm.data.chat import chat_prompt, render_chat
from nvlm.serve.client import ServerModel, chatml_to_messages, to_openai_messages


def test_chatml_round_trip():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "<image>\nQ?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "again\nline"},
    ]
    assert chatml_to_messages(render_chat(msgs)) == msgs
    assert chatml_to_messages("Question: 2+2=") == [{"role": "user", "content": "Question: 2+2="}]
    out = to_openai_messages(chat_prompt("Q?", 2), [picture(10, 10), picture(12, 10, 1)])
    assert [p["type"] for p in out[0]["content"]] == ["image_url", "image_url", "text"]
    with pytest.raises(ValueError, match="placeholder"):
        to_openai_messages(chat_prompt("Q?", 0), [picture(10, 10)])


def test_server_model_answers_equal_generate(build_model):
    model, processor = build_model("X")
    prompts = [chat_prompt("What is this?", 1), chat_prompt("Say hi.", 0), "Plain text prompt:"]
    images = [[picture(150, 100)], [], []]
    with served((model, processor)) as (url, _):  # (this sets the x-attn gates open, so the image matters)
        want = [model.generate(processor, p, im, max_new_tokens=6) for p, im in zip(prompts, images)]
        remote = ServerModel(url + "/v1", concurrency=3)
        assert remote.model == "nvlm" and "server:" in repr(remote)
        got = remote.generate(prompts, images, max_new_tokens=6)
    # a raw-text prompt becomes one user message, so only the chat prompts must match token for token
    assert got[:2] == want[:2] and isinstance(got[2], str)


def test_eval_run_cli_scores_a_served_model(build_model, tmp_path):
    """``nvlm eval run --server URL``: the pinned prompts go to the server, our scorer scores its answers."""
    import json

    from nvlm.cli import main

    picture(150, 100).save(tmp_path / "a.png")
    with open(tmp_path / "color.jsonl", "w") as f:
        for i, answer in enumerate(["red", "blue"]):
            f.write(
                json.dumps(
                    {
                        "id": f"q{i}",
                        "image": "a.png",
                        "task": "color",
                        "conversations": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": answer}],
                    }
                )
                + "\n"
            )
    model, processor = build_model("D")
    with served((model, processor)) as (url, _):
        code = main(
            [
                "eval",
                "run",
                "--server",
                url + "/v1",
                "--task",
                "demo",
                "--data",
                str(tmp_path / "color.jsonl"),
                "--out",
                str(tmp_path / "evals"),
                "--max-new-tokens",
                "4",
            ]
        )
        assert code == 0
        assert main(["eval", "run", "--task", "demo", "--data", str(tmp_path / "color.jsonl")]) == 2  # no model
    predictions = [json.loads(x) for x in open(tmp_path / "evals" / "demo" / "predictions.jsonl")]
    want = [model.generate(processor, chat_prompt("What color?", 1), [tmp_path / "a.png"], max_new_tokens=4)] * 2
    assert [p["prediction"] for p in predictions] == want
    summary = json.loads(open(tmp_path / "evals" / "demo" / "summary.json").read())
    assert summary["n"] == 2 and "server:" in json.dumps(
        json.loads(open(tmp_path / "evals" / "demo" / "run.json").read())
    )
