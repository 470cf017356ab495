"""Exports to the release layout keep the release's config.json key set (``auto_map``, ``_commit_hash``, the
4.39-era ``llm_config`` keys) and, with ``--remote-code-from``, its .py files; and every entry point asks the
release in its own prompt template.

python -m pytest tests/test_release_export.py -q
"""

from __future__ import annotations

import json

import pytest

from nvlm.cli import main
from nvlm.testing.replica import release_replica


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return release_replica(tmp_path_factory.mktemp("release") / "NVLM-D")


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k in ("llm_config", "vision_config"):
            out |= _keys(v, f"{k}.")
    return out


def test_release_to_ours_to_release_keeps_the_config(replica, tmp_path):
    assert main(["convert", str(replica), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "release"]) == 0
    want = json.loads((replica / "config.json").read_text())
    got = json.loads((tmp_path / "back" / "config.json").read_text())
    assert _keys(want) <= _keys(got)  # the release's key set, nested keys included
    for key in ("auto_map", "_commit_hash", "architectures", "model_type", "template", "ps_version"):
        assert got[key] == want[key], key
    for key, value in want["llm_config"].items():  # legacy names and the release's "llama" quirk included
        assert got["llm_config"][key] == value, key
    assert not list((tmp_path / "back").glob("*.py"))  # no code without --remote-code-from


def test_remote_code_from_copies_the_release_code(replica, build_model, tmp_path):
    from conftest import save_pair

    save_pair(build_model("D"), tmp_path / "ours")  # a model of our own, not converted from the release
    argv = ["convert", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "release"]
    assert main([*argv, "--remote-code-from", str(replica)]) == 0
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == json.loads((replica / "config.json").read_text())["auto_map"]
    for code in replica.glob("*.py"):
        assert (out / code.name).read_text() == code.read_text()
    assert cfg["llm_config"]["hidden_size"] == 64 and cfg["vision_config"]["hidden_size"] == 32  # ours, not its
    assert not (replica / "REMOTE_CODE_RAN").exists() and not (out / "REMOTE_CODE_RAN").exists()


def test_remote_code_from_must_be_the_release(build_model, tmp_path, capsys):
    from conftest import save_pair

    save_pair(build_model("D"), tmp_path / "ours")
    argv = ["convert", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "release"]
    assert main([*argv, "--remote-code-from", str(tmp_path / "ours")]) == 2
    assert "give the released NVLM-D folder" in capsys.readouterr().err


def test_every_entry_point_renders_the_release_template(replica):
    from nvlm.data.chat import chat_prompt
    from nvlm.eval.runner import render
    from nvlm.inference.prompt import render_messages
    from nvlm.loading import model_config
    from nvlm.serve.protocol import Message, build_prompt, forbidden_pattern

    template = model_config(replica).template
    assert template == "release"
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    want = chat_prompt("What is it?", 1, template="release")  # model.chat's prompt, the release's chat()
    assert want == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert render(messages, template) == want  # nvlm eval run
    assert render_messages(messages, template) == want
    import nvlm

    _, processor = nvlm.load(replica)
    served, _ = build_prompt([Message(role="user", content="What is it?")], forbidden_pattern(processor), template)
    assert served == chat_prompt("What is it?", 0, template="release")  # nvlm serve, a text-only request
    system = [{"role": "system", "content": "Be brief."}, *messages]
    assert render(system, template).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n")
    assert render(messages, "chatml").endswith("<|im_end|>\n<|im_start|>assistant\n")  # our own models: ChatML
