"""SIGTERM to the whole process group (as torchrun and Slurm send it) while the trainer waits on data workers
blocked in a slow read: the workers ignore it, the trainer's requested stop wins, the checkpoint is saved,
the run exits 0 without waiting for the wedged read, and no worker is left behind.

python -m pytest tests/test_data_signals.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_color_dataset

from nvlm.distributed.dcp import complete_checkpoints

SLOW_SOURCE = '''
import io
import time

from PIL import Image

from nvlm.data.formats import Conversation
from nvlm.data.sources.base import RecordSource


class SlowSource(RecordSource):
    """Each process's first read is quick; every later one takes a minute (a hung network mount)."""

    kind = "slow"

    def __init__(self, n):
        self.n, self.path = n, "slow"
        self._reset()

    def _reset(self):
        super()._reset()
        self._reads = 0

    def __len__(self):
        return self.n

    def read(self, i):
        self._reads += 1
        if self._reads > 1:
            time.sleep(60)
        buf = io.BytesIO()
        Image.new("RGB", (56, 56), (20 * i, 0, 0)).save(buf, "PNG")
        turns = [{"role": "user", "content": "<image>\\nWhat?"}, {"role": "assistant", "content": str(i)}]
        return Conversation(turns, [buf.getvalue()], f"slow[{i}]")
'''

DRIVER = """
import json, sys
import nvlm.training.trainer as trainer
from nvlm.data.blend import Source
from nvlm.data.mixture import Mixture
from nvlm.training.config import RunConfig
from slow_source import SlowSource

if __name__ == "__main__":  # (spawned workers import this file too)
    trainer.load_blend = lambda cfg: Mixture([Source("slow", SlowSource(8))], seed=0)  # read only in workers
    result = trainer.Trainer(RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False).run()
    print("RESULT", result.steps, result.interrupted, flush=True)
"""


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_while_workers_are_blocked(backbones, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 2, 0)  # named in the config only (its fingerprint)
    (tmp_path / "slow_source.py").write_text(SLOW_SOURCE)
    (tmp_path / "driver.py").write_text(DRIVER)
    cfg = {
        "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": [{"path": str(data / "images.jsonl")}], "max_seq_len": 256, "workers": 2},
        "train": {"max_steps": 20, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "min_lr": 1e-4},
    }
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "log.txt", "w")
    run = subprocess.Popen(  # its own process group, which the signal goes to (as torchrun's / Slurm's does)
        [sys.executable, str(tmp_path / "driver.py"), json.dumps(cfg), str(out)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # step 1 trained (each worker's first read is quick) ...
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # ... and step 2's samples are stuck in the workers' slow reads
        group = _group(run.pid)
        assert len(group) >= 3, group  # the trainer and its two workers (and multiprocessing's resource tracker)
        for pid in set(group) - {run.pid}:  # every helper process ignores SIGINT and SIGTERM: the trainer decides
            assert _ignored(pid) & {signal.SIGINT, signal.SIGTERM} == {signal.SIGINT, signal.SIGTERM}, pid
        signaled = time.monotonic()
        os.killpg(run.pid, signal.SIGTERM)
        rc = run.wait(timeout=45)  # not the minute the wedged reads would take
        took = time.monotonic() - signaled
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0, text[-3000:]
    assert "RESULT 1 True" in text and "stopped by a signal at step 1" in text, text[-3000:]
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_0000001"]
    assert took < 40
    while _group(run.pid) and time.monotonic() < signaled + 50:  # multiprocessing's tracker follows its parent
        time.sleep(0.1)
    assert _group(run.pid) == [], "worker processes outlived the run"


def _ignored(pid: int) -> set[int]:
    """The signals process `pid` ignores (/proc/PID/status SigIgn: bit n-1 for signal n)."""
    line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_a_requested_stop_wins_over_a_data_error_met_meanwhile(backbones, tmp_path):
    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 4, 0)
    cfg = RunConfig.from_dict({
        "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": [{"path": str(data / "images.jsonl")}], "max_seq_len": 256, "prefetch": 0},
        "train": {"max_steps": 5, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
                  "min_lr": 1e-4}})  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None)
    read, calls = trainer._read, []

    def read_then_break():  # the second read: SIGTERM arrives and the same signal breaks the worker pool
        calls.append(1)
        if len(calls) == 2:
            trainer._stop = True
            raise RuntimeError("A process in the process pool was terminated abruptly")
        return read()

    trainer._read = read_then_break
    result = trainer.run()
    assert result.interrupted and result.steps == 1
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_0000001"]


def _group(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids
