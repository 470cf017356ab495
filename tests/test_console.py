"""A console a person can read: the CLI prints our own output, not third-party deprecation warnings or the
"Loading weights" bars transformers draws on every load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ASSET = Path(__file__).parent / "assets" / "nvlm-x-before-wrapping"


@pytest.mark.slow
def test_chat_prints_the_answer_and_nothing_else():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run(
        [
            sys.executable,
            "-W",
            "default",
            "-m",
            "nvlm",
            "chat",
            "--model",
            str(ASSET),
            "--max-new-tokens",
            "4",
            "What color?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", f"the CLI printed more than its answer:\n{run.stderr[-2000:]}"
    assert run.stdout.strip()  # the answer itself


def test_saving_a_model_draws_no_transformers_bars(build_model, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    model, _ = build_model("X")
    hf_logging.enable_progress_bar()  # as in a user's process (the test fixtures turn the bars off)
    try:
        capfd.readouterr()
        model.save_pretrained(tmp_path / "saved")
        err = capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()  # the user's setting is left as it was
    finally:
        hf_logging.disable_progress_bar()
    assert (tmp_path / "saved" / "llm" / "config.json").exists()
    assert "Writing model shards" not in err, err[-1000:]
