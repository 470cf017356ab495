"""Sharded start-up on CPU: 2 gloo processes each read their own rows of the backbones' safetensors,
and the sharded model equals the one-process build exactly.

python -m pytest tests/test_sharded_load.py -q
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import dist_util
import pytest
import torch
from conftest import save_pair
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_distributed import tied_bf16_llm

from nvlm.training.build import build_model
from nvlm.training.config import RunConfig

# several processes each (gloo ranks, torchrun or a client package): the long tier, `pytest -m slow`
pytestmark = pytest.mark.slow

TIMEOUT_S = 240


class CountingOpen:
    """safetensors.safe_open that counts the bytes of every tensor (or slice of one) it hands out."""

    def __init__(self, counts: dict[str, int], path: str, *args, **kwargs) -> None:
        self._f, self._counts, self._path = safe_open(path, *args, **kwargs), counts, path

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self._counts[self._path] = self._counts.get(self._path, 0) + t.numel() * t.element_size()
        return t

    def keys(self):
        return self._f.keys()

    def get_tensor(self, key):
        return self._count(self._f.get_tensor(key))

    def get_slice(self, key):
        sl, count = self._f.get_slice(key), self._count

        class Slice:
            def get_shape(self):
                return sl.get_shape()

            def get_dtype(self):
                return sl.get_dtype()

            def __getitem__(self, box):
                return count(sl[box])

        return Slice()


def _worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import transformers

    from nvlm.distributed.parallel import init_world, shutdown
    from nvlm.models import fill, xattn_init
    from nvlm.training.build import build_sharded

    def no_full_read(*args, **kwargs):
        raise AssertionError("a process read the whole LLM (AutoModelForCausalLM.from_pretrained)")

    transformers.AutoModelForCausalLM.from_pretrained = no_full_read  # type: ignore[method-assign]
    world = init_world(timeout_s=120)
    try:
        for job in jobs:
            counts: dict[str, int] = {}
            fill.safe_open = lambda path, *a, counts=counts, **k: CountingOpen(counts, path, *a, **k)
            xattn_init.draw_rows = lambda t, chunk, rows, counts=counts, real=xattn_init.draw_rows: (
                counts.__setitem__("xattn drawn", counts.get("xattn drawn", 0) + rows * math.prod(t.shape[1:]))
                or real(t, chunk, rows)
            )
            model, _ = build_sharded(RunConfig.from_dict(job["cfg"]), world)
            full = {}
            for name, t in [*model.state_dict().items(), *(("buffer:" + n, b) for n, b in model.named_buffers())]:
                gather = getattr(t, "full_tensor", None)
                full[name] = (gather() if gather is not None else t).detach().cpu().contiguous()
            if world.main:
                save_file(full, f"{job['out']}.safetensors")
            with open(f"{job['out']}.bytes{rank}.json", "w") as f:
                json.dump(counts, f)
        # leave together: a process that tore its gloo group down while process 0 was still writing aborted
        # its peer once in five runs ("terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        shutdown(world)


def spawn(jobs: list[dict], world_size: int = 2) -> None:
    dist_util.spawn(_worker, jobs, world_size, TIMEOUT_S)


def model_cfg(backbones, arch: str, **model) -> dict:
    spec = {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"]), **model}
    return {"model": spec, "data": {"sources": [{"path": "unused.jsonl"}]}, "train": {"stage": "sft", "seed": 3}}


def one_process(cfg: dict) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from nvlm.models.names import backbone_names

    model, processor = build_model(RunConfig.from_dict(cfg))
    llm = cfg["model"]["llm"]
    if not cfg["model"].get("init_from"):  # the LLM's own rows as transformers itself reads the folder
        theirs = AutoModelForCausalLM.from_pretrained(llm).state_dict()
        ours = {k.removeprefix("llm."): v for k, v in backbone_names(model, model.state_dict()).items()}
        for key, value in theirs.items():
            assert torch.equal(ours[key][: value.shape[0]], value), key
    out = dict(model.state_dict())
    out.update({"buffer:" + n: b for n, b in model.named_buffers()})
    return out


def test_sharded_load_equals_one_process_and_reads_half(backbones, tmp_path):
    from nvlm.testing.tiny import tiny_vision_config

    ckpt = tmp_path / "stage1"
    save_pair(build_model(RunConfig.from_dict(model_cfg(backbones, "X", overrides={"tags.mode": "special"}))), ckpt)
    random_vision = {"type": "siglip", **tiny_vision_config("siglip").to_dict()}
    random_vision.pop("model_type", None)
    cases = {
        "D": model_cfg(backbones, "D"),
        "X": model_cfg(backbones, "X", overrides={"tags.mode": "special"}),  # tags: embedding rows added
        "H": model_cfg(backbones, "H"),
        "init_from": model_cfg(backbones, "X", init_from=str(ckpt)),
        "random_vision": model_cfg(backbones, "H", vision=random_vision),
        "tied_bf16": model_cfg(
            backbones, "D", llm=str(tied_bf16_llm(backbones, tmp_path)), overrides={"tags.mode": "special"}
        ),
    }
    jobs = [{"cfg": cfg, "out": str(tmp_path / name)} for name, cfg in cases.items()]
    spawn(jobs)
    for name, cfg in cases.items():
        got, want = load_file(str(tmp_path / f"{name}.safetensors")), one_process(cfg)
        assert got.keys() == want.keys(), name
        if "tags.mode" in cfg["model"].get("overrides", {}):  # the added tokens' rows were drawn, not read
            assert got["llm.model.embed_tokens.weight"].shape[0] > 427, name
        for key, value in want.items():
            assert torch.equal(got[key], value.to(got[key].dtype)), (name, key)
        # every process read about half of the LLM's weights; both together read each byte once
        llm_file = str(Path(cases[name]["model"].get("init_from", cfg["model"]["llm"])) / "model.safetensors")
        llm_file = llm_file.replace("model.safetensors", "llm/model.safetensors") if name == "init_from" else llm_file
        with safe_open(llm_file, "pt") as f:
            total = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        read = [json.loads((tmp_path / f"{name}.bytes{r}.json").read_text()).get(llm_file, 0) for r in (0, 1)]
        print(f"{name}: LLM {total} bytes on disk, read per process {read}")
        assert sum(read) == total, (name, read, total)
        assert max(read) < 0.6 * total, (name, read, total)
        # a new X/H model's x-attn blocks: every process drew about half of their random values, not all
        drawn = [json.loads((tmp_path / f"{name}.bytes{r}.json").read_text()).get("xattn drawn", 0) for r in (0, 1)]
        random = sum(v.numel() for k, v in want.items() if k.startswith("xattn.") and k.endswith("proj.weight"))
        new_blocks = cfg["model"]["arch"] != "D" and not cfg["model"].get("init_from")
        print(f"{name}: x-attn values drawn per process {drawn} of {random}")
        assert (sum(drawn) == random and max(drawn) < 0.6 * random) if new_blocks else drawn == [0, 0], (name, drawn)
