"""Training never loses or wedges work: Ctrl-C saves like SIGTERM even while the reader is wedged, a sample that
blocks times out as a bad one, and a resume after the data, blend or architecture changed is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest
from conftest import write_color_dataset

from nvlm.config import ConfigError
from nvlm.data.blend import Blend, SampleStream, Source
from nvlm.data.formats import Conversation
from nvlm.distributed.dcp import complete_checkpoints
from nvlm.training.config import RunConfig, override
from nvlm.training.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("data"), 8, 4)


def make_cfg(backbones, data, arch="D", steps=3, **train) -> RunConfig:
    sources = [{"path": str(data / "images.jsonl"), "weight": 3}, {"path": str(data / "text.jsonl")}]
    return RunConfig.from_dict({
        "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": sources, "max_seq_len": 256},
        "train": {"max_steps": steps, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "min_lr": 1e-4,
                  **train}})  # fmt: skip


def quiet(*args, **kwargs):
    pass


def test_sigint_while_the_reader_is_wedged_saves_and_stops(backbones, dataset, tmp_path):
    trainer = Trainer(make_cfg(backbones, dataset, steps=50), tmp_path / "run", log=quiet)
    real_read, wedge, reads = trainer._read, threading.Event(), []

    def read():  # two steps of data, then a read that never returns (a hung mount)
        reads.append(1)
        if len(reads) > 2:
            wedge.wait(20)  # without the stop-aware wait the run would sit here
        return real_read()

    trainer._read = read

    def interrupt_when_wedged():
        while trainer.step < 2:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    timer = threading.Thread(target=interrupt_when_wedged, daemon=True)
    timer.start()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where the suite runs in the background
    started = time.monotonic()
    result = trainer.run()  # a KeyboardInterrupt here would fail the test
    wedge.set()
    assert result.interrupted and result.steps == 2
    assert time.monotonic() - started < 15
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")[-1].name.endswith("_0000002")
    assert signal.getsignal(signal.SIGINT) is before  # restored after the run


class _SlowProcessor:
    """encode_segments blocks (like a read from a FIFO) for the conversation whose source is "slow"."""

    def __init__(self):
        self.release = threading.Event()

    def encode_segments(self, segments, images):
        if "SLOW" in segments[1][0]:
            self.release.wait(30)
        return type("Enc", (), {"input_ids": [1, 2, 3]})()


def test_a_sample_that_blocks_times_out_as_bad():
    convs = [Conversation([{"role": "user", "content": c}, {"role": "assistant", "content": "a"}], source=c)
             for c in ("ok1", "SLOW", "ok2")]  # fmt: skip
    processor = _SlowProcessor()
    stream = SampleStream(Blend([Source("s", convs)], seed=0), processor, max_seq_len=10, read_timeout=0.3)
    started = time.monotonic()
    got = [stream.next() for _ in range(4)]
    processor.release.set()
    assert len(got) == 4 and time.monotonic() - started < 10
    assert stream.counts["bad_sample"] >= 1
    assert any("SLOW" in e and "data.read_timeout_s" in e for e in stream.recent_errors)


def test_resume_refuses_changed_data_blend_or_arch_by_name(backbones, dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = tmp_path / "run"
    cfg = make_cfg(backbones, data, steps=2)
    Trainer(cfg, out, log=quiet).run()
    more = make_cfg(backbones, data, steps=4)
    with pytest.raises(ConfigError, match=r"model\.arch was \"D\" there and is \"X\" now; use a new --out"):
        Trainer(make_cfg(backbones, data, arch="X", steps=4), out, log=quiet).run()
    sources = [{"path": str(data / "images.jsonl"), "weight": 1}, {"path": str(data / "text.jsonl")}]
    reweighted = override(more, [f"data.sources={json.dumps(sources)}"])
    with pytest.raises(ConfigError, match=r"blend weight of 'images' changed \(3.0 -> 1.0\)"):
        Trainer(reweighted, out, log=quiet).run()
    with open(data / "text.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "new?"}, {"role": "assistant", "content": "x"}]})
                + "\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"data file of 'text' changed.*train\.allow_data_change=true"):
        Trainer(more, out, log=quiet).run()
    accepted = override(more, ["train.allow_data_change=true"])
    assert Trainer(accepted, out, log=quiet).run().steps == 4


@pytest.mark.parametrize(
    "item, message",
    [("train.global_batch_size=0", "global_batch_size must be >= 1"),
     ("train.micro_batch_size=0", "micro_batch_size must be >= 1"),
     ("train.max_steps=abc", "max_steps must be an integer, got 'abc'"),
     ("data.max_bad_fraction=2", "between 0 and 1"),
     ("data.read_timeout_s=0", "read_timeout_s must be > 0")],
)  # fmt: skip
def test_config_values_are_type_and_range_checked(backbones, dataset, item, message):
    with pytest.raises(ConfigError, match=message):
        override(make_cfg(backbones, dataset), [item])
