"""HumanEval: unbiased pass@k, program assembly, and the sandbox (time-out, no processes, no writes outside its
folder, no os.system, no network) still passing correct code."""

from __future__ import annotations

import os
import textwrap

import pytest

from nvlm.eval.scorers import SandboxError, ScoringError, score_items
from nvlm.eval.scorers import sandbox as sandbox_module
from nvlm.eval.scorers.humaneval import build_program, estimate_pass_at_k, pass_at_k
from nvlm.eval.scorers.sandbox import Limits, run_programs

TIMEOUT = 2.0
PROMPT = "def add(a, b):\n"
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n"


def _body(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n    return a + b\n"


def _attacks(outside: str) -> dict[str, str]:
    """Completions of ``add`` that misbehave first and return the right value after."""
    return {
        "infinite_loop": _body("while True:\n    pass"),
        "loop_swallowing_exceptions": _body("while True:\n    try:\n        pass\n    except Exception:\n        pass"),
        "subprocess": _body("import subprocess\nsubprocess.run(['echo', 'hi'])"),
        "os_fork": _body("import os\nos.fork()"),
        "multiprocessing": _body("import multiprocessing\nmultiprocessing.Process(target=print).start()"),
        "os_system": _body("import os\nos.system('true')"),
        "write_outside": _body(f"open({outside!r}, 'w').write('escaped')"),
        "pathlib_write_outside": _body(f"import pathlib\npathlib.Path({outside + '.2'!r}).write_text('x')"),
        "os_open_outside": _body(f"import os\nos.open({outside + '.3'!r}, os.O_WRONLY | os.O_CREAT)"),
        "delete_file": _body(f"import os\nos.remove({outside + '.keep'!r})"),
        "socket": _body("import socket\nsocket.create_connection(('127.0.0.1', 80))"),
        "memory_bomb": _body("x = bytearray(4 * 1024 ** 3)"),
        "exit_early": _body("import sys\nsys.exit(0)"),
        "write_inside": _body("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'"),
        "print_flood": _body("print('x' * 100000)"),
        "correct": "    return a + b\n",
    }


@pytest.fixture(scope="module")
def attack_results(tmp_path_factory):
    outside = str(tmp_path_factory.mktemp("outside") / "escaped.txt")
    with open(outside + ".keep", "w") as handle:  # a file outside the sandbox that must survive
        handle.write("keep")
    attacks = _attacks(outside)
    programs = [build_program(PROMPT, code, TEST, "add") for code in attacks.values()]
    statuses = run_programs(programs, Limits(timeout=TIMEOUT), workers=4)
    return dict(zip(attacks, statuses)), outside


def test_pass_at_k_vectors(vectors):
    for case in vectors["humaneval_pass_at_k"]:
        ns = case["n"] if isinstance(case["n"], list) else [case["n"]]
        cs = case["c"] if isinstance(case["c"], list) else [case["c"]]
        assert estimate_pass_at_k(ns, cs, case["k"]) == pytest.approx(case["expected"], abs=1e-4), case


def test_pass_at_k_edges():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(3, 3, 1) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0.0 < pass_at_k(10_000, 1, 5000) < 1.0  # no overflow where C(n, k) would be astronomically large


def test_program_assembly():
    assert build_program("P", "C", "T", "f") == "PC\nT\ncheck(f)"


def test_execution_vectors(vectors):
    v = vectors["humaneval_execution"]
    items = [
        {"prediction": c["pred"], "prompt": v["prompt"], "test": v["test"], "entry_point": v["entry_point"]}
        for c in v["cases"]
    ]
    out = score_items("humaneval", items, timeout=TIMEOUT, workers=4)
    assert out["items"] == [float(c["expected"]) for c in v["cases"]]
    assert out["results"][2] == "timed out"
    assert out["results"][5].startswith("failed: ") and "os.system" in out["results"][5]
    assert out["score"] == pytest.approx(100 * 2 / 8)


def test_sandbox_blocks_attacks_and_passes_correct_code(attack_results):
    results, outside = attack_results
    assert results["correct"] == "passed"
    assert results["write_inside"] == "passed"
    assert results["print_flood"] == "passed"
    assert results["infinite_loop"] == "timed out"
    assert results["loop_swallowing_exceptions"] == "timed out"
    for name in ("subprocess", "os_fork", "os_system", "write_outside", "pathlib_write_outside",
                 "os_open_outside", "delete_file", "socket"):  # fmt: skip
        assert results[name].startswith("failed: ") and "disabled" in results[name], (name, results[name])
    assert results["multiprocessing"].startswith("failed: import of multiprocessing halted")
    assert results["memory_bomb"].startswith("failed")
    assert results["exit_early"].startswith("failed")  # sys.exit before check() ran is not a pass
    for suffix in ("", ".2", ".3"):
        assert not os.path.exists(outside + suffix)
    assert os.path.exists(outside + ".keep")


def test_samples_grouped_by_task_id_give_pass_at_k():
    good, bad = "    return a + b\n", "    return 0\n"
    items = [
        {"task_id": f"T/{t}", "prediction": p, "prompt": PROMPT, "test": TEST, "entry_point": "add"}
        for t, preds in ((0, [good, bad] * 5), (1, [bad] * 10))
        for p in preds
    ]
    out = score_items("humaneval", items, timeout=TIMEOUT, workers=4)
    assert out["problems"] == 2 and out["n"] == 20
    assert out["pass@1"] == pytest.approx(25.0) and out["score"] == pytest.approx(25.0)
    assert out["pass@10"] == pytest.approx(50.0) and "pass@100" not in out


def test_missing_fields_are_errors():
    with pytest.raises(ScoringError, match='"entry_point"') as err:
        score_items("humaneval", [{"prediction": "", "prompt": PROMPT, "test": TEST}])
    assert err.value.index == 0


def test_broken_sandbox_is_an_error_not_a_zero(monkeypatch):
    monkeypatch.setattr(sandbox_module, "run_program", lambda program, limits=None: "failed: cannot start")
    with pytest.raises(SandboxError):
        run_programs(["pass"], Limits(timeout=1.0))
