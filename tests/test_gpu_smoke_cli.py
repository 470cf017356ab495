"""scripts/gpu_smoke.sh cannot run without a GPU; on CPU: the script parses (bash -n), its Python helper's
arguments parse, `prepare` writes a run config the trainer accepts, and `check-run` reads a real run.

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


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_smoke.sh")], check=True)


def test_every_subcommand_the_script_calls_parses(smoke):
    script = (ROOT / "scripts" / "gpu_smoke.sh").read_text()
    calls = [line.split("$PY", 1)[1].split() for line in script.splitlines() if "$PY " in line and "=" not in line]
    assert {c[0] for c in calls} == set(smoke.COMMANDS), calls
    for call in calls:
        args = smoke.parser().parse_args([a.strip('"').replace("$OUT", "/tmp/o") for a in call])
        assert args.cmd in smoke.COMMANDS
    args = smoke.parser().parse_args(["memory", "o", "--no-ac", "--compile"])
    assert (args.ac, args.compile, args.steps) == (False, True, 6)
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


def test_shell_script_refuses_a_used_output_before_any_work(tmp_path):
    (tmp_path / "x").write_text("")
    script = str(ROOT / "scripts" / "gpu_smoke.sh")
    done = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "--fresh" in done.stderr


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
