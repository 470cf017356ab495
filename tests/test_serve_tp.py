"""Tensor-parallel inference on 2 gloo processes (CPU): each rank reads only its block of the split projections,
and the engine on rank 0 with a follower answers several concurrent greedy requests exactly as one process does,
for NVLM-D, -X and -H; the follower returns when the engine stops.

python -m pytest tests/test_serve_tp.py -q
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import dist_util
import pytest
import torch
from conftest import picture, save_pair, set_gates

from nvlm.data.chat import chat_prompt

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


def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    dist_util.worker_env(rank, world_size, port)
    from nvlm.distributed.inference import control_group, inference_mesh
    from nvlm.distributed.parallel import init_world, shutdown
    from nvlm.loading import load_sharded
    from nvlm.serve.engine import Engine
    from nvlm.serve.tp import Steps, follow

    world = init_world(timeout_s=120)
    mesh, group = inference_mesh(world), control_group()
    try:
        for job in jobs:
            out: dict = {}
            try:
                model, processor = load_sharded(job["model"], mesh)
                out["local_elements"] = sum(p.numel() for p in model.parameters())
                if rank == 0:
                    engine = Engine(model, processor, max_batch=3, prefix_cache=False, runners=Steps(group))
                    engine.start()
                    try:
                        out["ids"] = answers(engine)
                    finally:
                        engine.close()
                else:
                    out["steps"] = follow(model, group)
            except Exception:  # noqa: BLE001 - reported to the test process
                out["error"] = traceback.format_exc()
            Path(f"{job['out']}.rank{rank}.json").write_text(json.dumps(out))
    finally:
        shutdown(world)


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
    dist_util.spawn(_worker, jobs, 2, TIMEOUT_S)
    torch.set_num_threads(1)
    for arch in ("D", "X", "H"):
        lead, follower = (dist_util.result(tmp_path / arch, r) for r in (0, 1))
        assert "error" not in lead and "error" not in follower, lead.get("error") or follower.get("error")
        model, processor = nvlm.load(saved[arch])
        engine = Engine(model, processor, max_batch=3).start()
        try:
            want = answers(engine)
        finally:
            engine.close()
        assert lead["ids"] == want, arch
        assert all(len(ids) > 0 for ids in want)
        # each rank holds half of the split projections: fewer elements than the whole model, the same on both
        whole = sum(p.numel() for p in model.parameters())
        assert lead["local_elements"] == follower["local_elements"] < whole
        assert follower["steps"] > sum(BUDGETS) // 3  # it ran the decoding steps, then returned on "stop"
