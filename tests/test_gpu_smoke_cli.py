"""The device checks (scripts/gpu_correctness.sh, scripts/gpu_perf.sh) cannot run without a GPU; on CPU: they
parse (bash -n), their --dry-run prints one JSON line per step whose helper calls parse, they refuse a used
output, the helper (scripts/gpu_smoke.py) imports this checkout's nvlm as a file, `prepare` writes a run config
the trainer accepts, and `check-run` / `check-stop` read real runs.

python -m pytest tests/test_gpu_smoke_cli.py -q
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = ("gpu_correctness.sh", "gpu_perf.sh")


def dry_run(script: str) -> list[dict]:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), "--dry-run", "/tmp/o"], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_its_dry_run_lists_each_step_as_json(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
    steps = dry_run(script)
    names = [s["step"] for s in steps]
    assert names[0] == "env" and len(names) == len(set(names)) >= 5
    limits = sum(s.get("limit_s", 0) for s in steps)
    assert limits <= (780 if script == "gpu_correctness.sh" else 600)  # worst case; typical runs take less


def test_every_helper_call_of_the_scripts_parses(smoke):
    calls = [s["cmd"] for script in SCRIPTS for s in dry_run(script) if "scripts/gpu_smoke.py" in s.get("cmd", [])]
    args = [c[c.index("scripts/gpu_smoke.py") + 1 :] for c in calls]
    assert {a[0] for a in args} == set(smoke.COMMANDS), args
    for a in args:
        assert smoke.parser().parse_args(a).cmd in smoke.COMMANDS
    parsed = smoke.parser().parse_args(["memory", "o", "--no-ac", "--compile"])
    assert (parsed.ac, parsed.compile, parsed.steps, parsed.warmup) == (False, True, 6, 1)
    with pytest.raises(SystemExit):
        smoke.parser().parse_args(["check-run", "run"])  # --steps is required


def test_prepare_writes_a_run_the_trainer_accepts_and_check_run_reads_it(smoke, tmp_path, capsys):
    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    smoke.main(["prepare", str(tmp_path), "--hidden", "64", "--layers", "2", "--samples", "8"])
    cfg = smoke.run_config(tmp_path, max_steps=3, save_every=0, global_batch_size=2, micro_batch_size=1, bf16=False)
    Trainer(RunConfig.from_dict(cfg), tmp_path / "run", log=lambda *a, **k: None).run()
    capsys.readouterr()
    smoke.main(["check-run", str(tmp_path / "run"), "--steps", "3"])
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["checkpoints"] == ["step_0000003"]


def test_run_as_a_file_it_imports_this_checkouts_nvlm(tmp_path):
    """``python scripts/gpu_smoke.py`` puts scripts/ on sys.path, not the repository root: the script adds it."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["prepare", str(tmp_path / "o"), "--hidden", "32", "--layers", "1", "--samples", "2"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert Path(json.loads(done.stdout)["nvlm"]).resolve().is_relative_to(ROOT / "nvlm")


def test_prepare_refuses_a_used_output_unless_fresh(smoke, tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="not empty .* --fresh"):
        smoke.main(["prepare", str(tmp_path), "--hidden", "32", "--layers", "1", "--samples", "2"])
    smoke.main(["prepare", str(tmp_path), "--hidden", "32", "--layers", "1", "--samples", "2", "--fresh"])
    assert not (tmp_path / "train").exists() and (tmp_path / "run.json").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_script_refuses_a_used_output_before_any_work(tmp_path, script):
    (tmp_path / "x").write_text("")
    done = subprocess.run(["bash", str(ROOT / "scripts" / script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "--fresh" in done.stderr and (tmp_path / "x").exists()
    done = subprocess.run(["bash", str(ROOT / "scripts" / script), "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr


def test_check_stop_judges_by_the_checkpoint_not_the_exit_code(smoke, tmp_path, capsys):
    from dist_util import stop_after

    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    smoke.main(["prepare", str(tmp_path), "--hidden", "64", "--layers", "2", "--samples", "8"])
    cfg = smoke.run_config(tmp_path, max_steps=5, save_every=0, global_batch_size=2, micro_batch_size=1, bf16=False)
    trainer = Trainer(RunConfig.from_dict(cfg), tmp_path / "run", log=lambda *a, **k: None)
    stop_after(trainer, 2)
    assert trainer.run().steps == 2
    capsys.readouterr()
    for said, ok in (("saved and stopped at step 2: r", True), ("saved and stopped at step 3: r", False), ("", False)):
        (tmp_path / "log").write_text(f"torchrun noise\n{said}\n")
        smoke.main(["check-stop", str(tmp_path / "run"), "--log", str(tmp_path / "log")])
        assert json.loads(capsys.readouterr().out)["ok"] is ok, said
