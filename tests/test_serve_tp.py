"""Tensor-parallel inference on 2 gloo processes (CPU): each rank reads only its block of the split projections,
and the engine on rank 0 with a follower answers several concurrent greedy requests exactly as one process does,
for NVLM-D, -X and -H; the follower returns when the engine stops.

python -m pytest tests/test_serve_tp.py -q
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

import dist_util
import pytest
import torch
from conftest import picture, save_pair, set_gates

from nvlm.data.chat import chat_prompt

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

TIMEOUT_S = 240
PROMPTS = [
    (chat_prompt("Describe.", 1), [(150, 100, 0)]),
    (chat_prompt("Hi", 0), []),
    (chat_prompt("Compare the two.", 2), [(120, 60, 1), (50, 50, 2)]),
    (chat_prompt("What is 2+2?", 0), []),
]
BUDGETS = [12, 7, 10, 5]


def answers(engine) -> list[list[int]]:
    """The token ids of every prompt, submitted together (one batched prefill, rows leaving at different steps)."""
    from nvlm.serve.engine import SamplingParams

    with engine.hold():
        reqs = [
            engine.submit(p, [picture(*im) for im in ims], SamplingParams(max_tokens=n, temperature=0.0))
            for (p, ims), n in zip(PROMPTS, BUDGETS, strict=True)
        ]
    for r in reqs:
        r.result()
    return [list(r.output_ids) for r in reqs]


def prefill_logits(model, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position's logits of two prompts (one with an image) through a runner, and through a plain
    forward (as an eval's letter scoring runs it): both mirrored to the followers under TP."""
    from nvlm.inference.runner import ModelRunner

    samples = [processor.encode(p, [picture(*im) for im in ims]) for p, ims in PROMPTS[:2]]
    batch = processor.collate(samples, padding_side="left")
    batch.pop("labels", None)
    with torch.inference_mode():
        runner = ModelRunner(model).prefill(batch, [0, 1])[:, -1]
        return runner, model(**batch, logits_to_keep=1).logits[:, -1]


@contextlib.contextmanager
def failing_decode(at: int) -> Iterator[None]:
    """The `at`-th decoding forward of this process raises (before its collectives, as a bad input would): the
    same step on every rank, each counting its own."""
    from nvlm.models.nvlm import NVLM

    forward, calls = NVLM.forward, [0]

    def failing(self, *args, **kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        if kwargs.get("past_key_values") is not None and ids.shape[1] == 1:  # a decoding step
            calls[0] += 1
            if calls[0] == at:
                raise RuntimeError("injected failure")
        return forward(self, *args, **kwargs)

    NVLM.forward = failing
    try:
        yield
    finally:
        NVLM.forward = forward


def serve_through_a_failed_step(model, processor) -> tuple[str, list[list[int]]]:
    """Rank 0's engine fails the rows in flight at the failing step, the follower logs it, and both go on
    serving (each with a fresh runner). Returns the failed requests' error and the next requests' token ids."""
    from nvlm.serve.engine import Engine, EngineError

    engine = Engine(model, processor, max_batch=3).start()
    try:
        try:
            answers(engine)
            error = "no error"
        except EngineError as e:
            error = str(e)
        return error, answers(engine)
    finally:
        engine.close()


def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    """``load_checked`` as ``nvlm serve`` runs it under torchrun: rank 0 serves the prompts with the engine, then
    stops the followers; a follower returns from the load only by exiting (SystemExit 0) once told to stop."""
    dist_util.worker_env(rank, world_size, port)
    from nvlm.distributed.parallel import shutdown
    from nvlm.inference.memory import Serving, load_checked
    from nvlm.inference.quantize import summary
    from nvlm.serve.engine import Engine

    for job in jobs:
        out: dict = {}
        try:
            s = Serving(device="cpu", dtype="float32", max_batch=3, quantize=job.get("quantize"))
            with failing_decode(job["fail_at"]) if job.get("fail_at") else contextlib.nullcontext():
                model, processor = load_checked(job["model"], s)
            out["local_elements"] = sum(p.numel() for p in model.parameters())
            try:
                if job.get("fail_at"):
                    with failing_decode(job["fail_at"]):
                        out["error_event"], out["ids"] = serve_through_a_failed_step(model, processor)
                elif job.get("quantize"):
                    out["quantized"] = summary(model)["quantized"]
                    out["logits"], out["forward"] = (t.tolist() for t in prefill_logits(model, processor))
                else:
                    chunk = job.get("max_prefill_tokens", 16384)  # smaller: long prompts in chunks
                    engine = Engine(model, processor, max_batch=3, max_prefill_tokens=chunk).start()
                    try:
                        out["ids"] = answers(engine)
                    finally:
                        engine.close()
            finally:
                model.tp_steps.close()
        except SystemExit as e:
            out["follower_exit"] = e.code
        except Exception:  # noqa: BLE001 - reported to the test process
            out["error"] = traceback.format_exc()
        Path(f"{job['out']}.rank{rank}.json").write_text(json.dumps(out))
    from nvlm.distributed.parallel import World

    shutdown(World(distributed=True))


@pytest.fixture(scope="module")
def saved(build_model, tmp_path_factory):
    """{arch: folder} of tiny D, X and H models saved as nvlm.load reads them, their gates open."""
    root = tmp_path_factory.mktemp("tp_models")
    out = {}
    for arch in ("D", "X", "H"):
        model, processor = build_model(arch)
        set_gates(model, 0.5)  # the x-attn blocks really change the output
        save_pair((model, processor), root / arch)
        out[arch] = root / arch
    return out


def test_two_ranks_answer_as_one_for_d_x_and_h(saved, tmp_path):
    import nvlm
    from nvlm.serve.engine import Engine

    jobs = [{"model": str(saved[a]), "out": str(tmp_path / a)} for a in ("D", "X", "H")]
    jobs[2]["max_prefill_tokens"] = 48  # H: every prompt prefilled alone, those with images in chunks
    jobs.append({"model": str(saved["X"]), "out": str(tmp_path / "int8"), "quantize": "int8"})
    jobs.append({"model": str(saved["D"]), "out": str(tmp_path / "fail"), "fail_at": 3})
    dist_util.spawn(_worker, jobs, 2, TIMEOUT_S)
    torch.set_num_threads(1)
    for arch in ("D", "X", "H"):
        lead, follower = (dist_util.result(tmp_path / arch, r) for r in (0, 1))
        assert "error" not in lead and "error" not in follower, lead.get("error") or follower.get("error")
        assert follower == {"follower_exit": 0}  # it left the load only when rank 0 stopped it
        model, processor = nvlm.load(saved[arch])
        engine = Engine(model, processor, max_batch=3).start()
        try:
            want = answers(engine)
        finally:
            engine.close()
        assert lead["ids"] == want, arch
        assert all(len(ids) > 0 for ids in want)
        # rank 0 holds half of each split projection: fewer elements than the whole model
        assert lead["local_elements"] < sum(p.numel() for p in model.parameters())
    # a step that fails on every rank fails its requests; serving goes on, on both ranks, with the same answers
    failed, follower = (dist_util.result(tmp_path / "fail", r) for r in (0, 1))
    assert follower == {"follower_exit": 0}
    assert "injected failure" in failed["error_event"] and failed["ids"] == dist_util.result(tmp_path / "D")["ids"]
    # int8 weight-only under TP: the same Linears quantized, each rank its block (a row-parallel block's rows
    # get scales of their own half), logits close to one process's int8
    from nvlm.inference.memory import Serving, load_checked
    from nvlm.inference.quantize import summary

    lead = dist_util.result(tmp_path / "int8", 0)
    assert "error" not in lead, lead.get("error")
    model, processor = load_checked(saved["X"], Serving(device="cpu", dtype="float32", quantize="int8"))
    want, _ = prefill_logits(model, processor)
    got = torch.tensor(lead["logits"])
    torch.testing.assert_close(torch.tensor(lead["forward"]), got)  # the plain forward ran on both ranks too
    err = (got - want).abs().max().item()
    print(f"int8 TP 2 vs 1 process: max |logit error| {err:.2e} (logits' range {want.abs().max().item():.2f})")
    assert lead["quantized"] == summary(model)["quantized"] > 0
    assert err < 0.05 * want.abs().max().item()


def _torchrun(args: list[str]) -> list[str]:
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    return [*run, "-m", "nvlm", *args]


def _color_data(tmp_path: Path) -> Path:
    picture(150, 100).save(tmp_path / "a.png")
    rows = [
        {
            "id": f"q{i}",
            "image": "a.png",
            "task": "color",
            "conversations": [{"from": "human", "value": f"What color{'?' * (i + 1)}"}, {"from": "gpt", "value": a}],
        }
        for i, a in enumerate(["red", "blue", "green"])
    ]
    (tmp_path / "color.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "color.jsonl"


@pytest.mark.slow
def test_eval_run_under_torchrun_predicts_as_one_process(saved, tmp_path):
    """``torchrun --nproc_per_node=2 -m nvlm eval run --model M``: rank 0 runs the eval (and alone writes it),
    rank 1 follows its generate calls; the predictions equal one process's."""
    import subprocess

    from nvlm.cli import main

    data = _color_data(tmp_path)
    common = ["eval", "run", "--task", "demo", "--data", str(data), "--max-new-tokens", "6", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = _torchrun([*common, "--model", str(saved["H"]), "--out", str(tmp_path / "tp")])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("predictions:") == 1, proc.stdout  # rank 0 alone reports
    assert main([*common, "--model", str(saved["H"]), "--out", str(tmp_path / "one")]) == 0
    got, want = (sorted((tmp_path / d).rglob("predictions.jsonl")) for d in ("tp", "one"))
    assert len(got) == len(want) == 1
    rows = [[json.loads(line)["prediction"] for line in p[0].read_text().splitlines()] for p in (got, want)]
    assert rows[0] == rows[1] and len(rows[0]) == 3


@pytest.mark.slow
def test_serve_under_torchrun_answers_concurrent_requests_and_stops_every_rank(saved, tmp_path):
    """``torchrun --nproc_per_node=2 -m nvlm serve M``: concurrent chat requests over HTTP answer as
    ``model.generate`` on one process; on SIGTERM the server drains and both ranks exit (none hangs)."""
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    import nvlm
    from nvlm.serve.client import ServerModel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = _torchrun(["serve", str(saved["X"]), "--port", str(port), "--device", "cpu", "--max-batch", "3"])
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        prompts = [chat_prompt(q, len(ims)) for q, ims in [("What is this?", [0]), ("Say hi.", []), ("And?", [1])]]
        images = [[picture(150, 100)], [], [picture(60, 140, 3)]]
        got = ServerModel(url + "/v1", concurrency=3).generate(prompts, images, max_new_tokens=8)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks; rank 0 drains and stops rank 1
        assert proc.wait(timeout=90) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "nvlm.serve INFO stopped" in text and "rank 1: rank 0 stopped after" in text, text[-3000:]
    # no traceback of ours (torchrun itself raises one when it gets SIGTERM, after its workers have left)
    assert not [line for line in text.splitlines() if line.startswith('  File "') and "/nvlm/" in line], text
    model, processor = nvlm.load(saved["X"])
    want = [model.generate(processor, p, im, max_new_tokens=8) for p, im in zip(prompts, images, strict=True)]
    assert got == want


def test_tp_without_torchrun_is_a_one_line_error(saved, capsys):
    from nvlm.cli import main

    assert main(["serve", str(saved["D"]), "--tp", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node=2 -m nvlm" in err and "Traceback" not in err
