"""A console a person can read: the CLI prints our own output, not third-party deprecation warnings or the
"Loading weights" bars transformers draws on every load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ASSET = Path(__file__).parent / "assets" / "nvlm-x-before-wrapping"


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
