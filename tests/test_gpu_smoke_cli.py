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
