"""The registry, the modes, and the rule that the scorers import neither torch nor other nvlm subpackages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nvlm.eval.scorers as scorers
from nvlm.eval.scorers import SCORERS, score_items

EVAL_DIR = Path(scorers.__file__).resolve().parent.parent
ALLOWED_THIRD_PARTY = {"numpy", "pyarrow"}  # pyarrow: the readers of parquet releases


def test_thirteen_tasks_with_scales():
    assert list(SCORERS) == ["vqav2", "textvqa", "docvqa", "chartqa", "ocrbench", "mmmu", "mathvista", "ai2d",
                             "realworldqa", "gsm8k", "math", "mmlu", "humaneval"]  # fmt: skip
    out = score_items("ai2d", [{"prediction": "A", "answers": ["A"]}])
    assert {"task", "mode", "score", "n", "items", "metric", "scale"} <= set(out)


def test_unknown_task_and_mode():
    with pytest.raises(ValueError, match="unknown task"):
        score_items("vqa", [{"prediction": "a", "answers": ["a"]}])
    with pytest.raises(ValueError, match="unknown mode"):
        score_items("vqav2", [{"prediction": "a", "answers": ["a"]}], mode="megatron")


@pytest.mark.parametrize("path", sorted(p for p in EVAL_DIR.rglob("*.py") if p.name != "runner.py"), ids=str)
def test_imports_are_stdlib_numpy_or_nvlm_eval(path):
    import sys

    tree = ast.parse(path.read_text(encoding="utf-8"))
    # the eval command may reach a model server inside the function that runs it (eval run --server)
    nodes = tree.body if path.name == "cli.py" else ast.walk(tree)
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top == "nvlm":
                assert name.startswith("nvlm.eval"), f"{path.name} imports {name}"
            else:
                assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY, f"{path.name} imports {name}"
