"""One error path in the CLI: a bad input exits 2 with one line ``error: ...`` naming the input and the fix, and
no traceback; ``--debug`` brings the traceback back.

The first table runs ``main`` in this process on inputs that get as far as data and models; the walk at the end
runs ``python -m nvlm`` as a user would, in an empty folder, on the mistakes a newcomer makes first (each is
caught before any model loads, so the walk is cheap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_color_dataset

from nvlm.cli import main


@pytest.fixture(scope="module")
def setup(backbones, tmp_path_factory):
    """A data set, a run config writer, a saved tiny model and a trained 1-step run folder (arch D)."""
    import nvlm

    root = tmp_path_factory.mktemp("cli")
    (root / "d").mkdir()
    data = write_color_dataset(root / "d", 4, 2)
    (root / "bad.jsonl").write_text("{not json\n{nor this\n")  # no record reads: refused before training
    (root / "url.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "a.png"}]},
        {"role": "assistant", "content": "a"}]}) + "\n")  # fmt: skip
    (root / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (root / "evil.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    (root / "fake_model").mkdir()
    (root / "fake_model" / "config.json").write_text("{}")
    model, processor = nvlm.build("D", llm=str(backbones["qwen2"]), vision=str(backbones["internvl"]))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")

    def config(name: str, data_file=None, arch="D", **train) -> str:
        sources = [{"path": str(data_file or data / "text.jsonl")}]
        cfg = {"model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
               "data": {"sources": sources, "max_seq_len": 256},
               "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2, **train}}  # fmt: skip
        (root / name).write_text(yaml.safe_dump(cfg))
        return str(root / name)

    assert main(["train", config("d.yaml"), "--out", str(root / "run")]) == 0
    return root, config


CASES = {
    "non-numeric max_steps": (lambda r, c: ["train", c("a.yaml"), "--out", f"{r}/o", "train.max_steps=abc"],
                              "train.max_steps must be an integer"),
    "micro_batch_size=0": (lambda r, c: ["train", c("a.yaml"), "--out", f"{r}/o", "train.micro_batch_size=0"],
                           "train.micro_batch_size must be >= 1"),
    "missing data file": (lambda r, c: ["train", c("m.yaml", r / "nope.jsonl"), "--out", f"{r}/o"],
                          "nope.jsonl: data file not found"),
    "image_url as a string": (lambda r, c: ["train", c("u.yaml", r / "url.jsonl"), "--out", f"{r}/o"],
                              'url.jsonl:1: message 0 has a malformed image_url part'),
    "malformed JSONL line": (lambda r, c: ["train", c("b.yaml", r / "bad.jsonl"), "--out", f"{r}/o"],
                             "bad.jsonl:1: not valid JSON"),
    "YAML python tag": (lambda r, c: ["train", str(r / "evil.yaml"), "--out", f"{r}/o"], "evil.yaml: not a valid"),
    "resume with another arch": (lambda r, c: ["train", c("x.yaml", arch="X"), "--out", f"{r}/run"],
                                 'model.arch was "D" there and is "X" now'),
    "chat: missing model": (lambda r, c: ["chat", "hi", "--model", f"{r}/no_model"], "no_model: no saved nvlm"),
    "chat: missing image": (lambda r, c: ["chat", "hi", "--model", f"{r}/fake_model", "--image", f"{r}/no.png"],
                            "--image"),
    "chat: control token": (lambda r, c: ["chat", "hi<|im_end|>", "--model", f"{r}/model"], "'<|im_end|>'"),
    "chat --top-p 0": (lambda r, c: ["chat", "hi", "--model", f"{r}/model", "--top-p", "0"], "--top-p: must be in"),
    "inspect --max-tiles 0": (lambda r, c: ["inspect", "--size", "9x9", "--max-tiles", "0"], "--max-tiles"),
    "negative --tokens-per-tile": (lambda r, c: ["inspect", "--size", "9x9", "--tokens-per-tile", "-5"],
                                   "--tokens-per-tile"),
    "deeply nested JSON": (lambda r, c: ["eval", "score", "vqav2", str(r / "nested.jsonl")], "nested too deeply"),
    "/dev/zero for eval": (lambda r, c: ["eval", "score", "vqav2", "/dev/zero"], "/dev/zero: not a regular file"),
    "/dev/zero for inspect": (lambda r, c: ["inspect", "/dev/zero"], "/dev/zero: not a regular file"),
    "/dev/zero as config": (lambda r, c: ["train", "/dev/zero", "--out", f"{r}/o"], "/dev/zero"),
}  # fmt: skip


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(setup, capsys, case):
    root, config = setup
    make_argv, expected = CASES[case]
    code, err = _run(make_argv(root, config), capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("train:")]  # no tqdm
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and expected in lines[0], lines[0]


def test_debug_shows_the_traceback(setup, capsys):
    root, config = setup
    with pytest.raises(Exception, match="train.micro_batch_size must be >= 1"):
        main(["--debug", "train", config("a.yaml"), "--out", f"{root}/o", "train.micro_batch_size=0"])


# ---- the walk: `python -m nvlm ...` in an empty folder (plus model/config.json, a stand-in model folder) --------
WALK = {
    "unknown recipe": (["train", "no-such-recipe", "--out", "o"], "'no-such-recipe' is neither a recipe"),
    "missing config file": (["train", "run.yaml", "--out", "o"], "'run.yaml' is neither a recipe"),
    "train without --out": (["train", "d-72b-pretrain"], "needs --out DIR"),
    "tiny recipe before nvlm demo": (["train", "tiny-d", "--out", "o"], "run `nvlm demo` first"),
    "paper recipe without weights": (["train", "d-72b-pretrain", "--out", "o"], "weights/Qwen2-72B-Instruct is not"),
    "stage 2 before stage 1": (["train", "d-34b-sft", "--out", "o"], "train stage 1 first"),
    "backbone override to nowhere": (["train", "h-34b-pretrain", "--out", "o", "model.llm=nowhere"],
                                     "model.llm folder nowhere is not there"),
    "unknown override key": (["train", "d-72b-pretrain", "--out", "o", "train.nope=1"], "unknown config key"),
    "bad override value": (["train", "d-72b-pretrain", "--out", "o", "train.max_steps=abc"],
                           "train.max_steps must be an integer"),
    "override without a value": (["train", "d-72b-pretrain", "--out", "o", "train.max_steps"], "key=value"),
    "serve: missing model": (["serve", "nowhere"], "nowhere: no saved nvlm model there"),
    "serve: port out of range": (["serve", "model", "--port", "99999"], "--port: must be between 1 and 65535"),
    "serve: port not a number": (["serve", "model", "--port", "http"], "--port: expected an integer"),
    "chat: missing model": (["chat", "hi", "--model", "nowhere"], "--model nowhere: no saved nvlm model"),
    "chat: missing image": (["chat", "hi", "--model", "model", "--image", "no.png"], "--image no.png: no such file"),
    "eval run: missing model": (["eval", "run", "--model", "nowhere", "--task", "gsm8k", "--data", "gsm8k.jsonl"],
                                "nowhere"),
    "eval score: missing predictions": (["eval", "score", "vqav2", "no.jsonl"], "no.jsonl: cannot read"),
    "inspect: missing image": (["inspect", "no.png"], "no.png: file not found"),
    "convert: missing source": (["convert", "nowhere", "out"], "nowhere: no config.json"),
    "merge: missing source": (["merge", "nowhere", "out"], "nowhere: no such folder"),
    "unknown command": (["bogus"], "invalid choice: 'bogus'"),
    "unknown flag": (["chat", "hi", "--model", "model", "--nope"], "unrecognized arguments: --nope"),
}  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", list(WALK))
def test_walk_user_mistakes(tmp_path, case):
    argv, expected = WALK[case]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "nvlm", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]
