"""GPU checks (skipped without CUDA): the invariants hold on the device, bf16 runs, training steps on GPU
(loss falls over several steps, sharded = plain, a stopped run resumes where it stopped).

python -m pytest tests/test_gpu.py -m gpu -q        (on a machine with a CUDA GPU; without ``-m gpu`` the
suite hides CUDA, see conftest.py, and these skip)
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and pytest -m gpu"),
]


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_cuda_cached_equals_uncached_and_batch_equals_single(build_model, arch):
    from nvlm.data.chat import chat_prompt
    from nvlm.inference.generate import generate_ids

    model, processor = build_model(arch)
    model.cuda()
    set_gates(model, 0.5)
    texts = [chat_prompt("Describe.", 1), chat_prompt("Hi", 0)]
    images = [[picture(150, 100)], []]
    batch = processor(texts, images)
    cached = torch.stack(list(generate_ids(model, batch, 8, use_cache=True)), 1)
    uncached = torch.stack(list(generate_ids(model, batch, 8, use_cache=False)), 1)
    assert cached.device.type == "cuda" and torch.equal(cached, uncached)
    with torch.no_grad():
        logits = model(**batch).logits
        single = model(**processor(texts[0], images[0])).logits[0]
    torch.testing.assert_close(logits[0, -single.shape[0] :], single, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_bf16_forward_and_generation(build_model, arch):
    model, processor = build_model(arch)
    model.to("cuda", torch.bfloat16)
    set_gates(model, 0.5)
    out = model(**processor("<image>\nWhat?", [picture(150, 100)]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert isinstance(model.chat(processor, "What?", image=picture(120, 60), max_new_tokens=4), str)


def test_training_on_gpu_with_bf16_autocast(backbones, tmp_path):
    import json

    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    (tmp_path / "img").mkdir()
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(16):
            picture(150, 100, i).save(tmp_path / f"img/{i}.png")
            f.write(
                json.dumps(
                    {
                        "image": f"img/{i}.png",
                        "conversations": [
                            {"from": "human", "value": "<image>\nColor?"},
                            {"from": "gpt", "value": "red"},
                        ],
                    }
                )
                + "\n"
            )
    cfg = RunConfig.from_dict(
        {
            "model": {"arch": "H", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": [{"path": str(tmp_path / "d.jsonl")}], "max_seq_len": 256},
            "train": {"stage": "sft", "max_steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "lr": 3e-3},
        }
    )
    trainer = Trainer(cfg, tmp_path / "run", log=lambda *a: None)
    assert next(trainer.model.parameters()).device.type == "cuda"
    result = trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 12 and rows[-1]["loss"] < rows[0]["loss"]


def test_sharded_training_on_gpu_matches_plain(backbones, tmp_path):
    """FSDP2 with bf16 gathered weights and fp32 reduction (1 NCCL process) against the plain bf16-autocast run:
    same first loss within 2 %, both falling, and the exported model loads."""
    import json

    from conftest import write_color_dataset
    from test_distributed import losses, spawn

    import nvlm
    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 24, 24)
    cfg = {
        "model": {"arch": "X", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {
            "sources": [{"path": str(data / "images.jsonl")}, {"path": str(data / "text.jsonl")}],
            "max_seq_len": 256,
        },
        "train": {"stage": "sft", "max_steps": 8, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3},
    }
    spawn([{"kind": "train", "cfg": cfg, "out": str(tmp_path / "sharded")}], world_size=1)
    Trainer(RunConfig.from_dict(cfg), tmp_path / "plain", log=lambda *a: None).run()
    sharded, plain = losses(tmp_path / "sharded"), losses(tmp_path / "plain")
    assert len(sharded) == len(plain) == 8
    # every step, not only the first: bf16 gathers drift a little from autocast, not away
    assert all(abs(s - p) < 0.05 * p for s, p in zip(sharded, plain, strict=True)), (sharded, plain)
    assert sharded[-1] < sharded[0] and plain[-1] < plain[0]
    assert json.loads((tmp_path / "sharded.rank0.json").read_text())["steps"] == 8
    nvlm.from_pretrained(tmp_path / "sharded" / "final")


def test_stopped_run_resumes_on_gpu(backbones, tmp_path):
    """bf16 on the GPU with background checkpoints: a run stopped after step 4 (as by SIGTERM) saves, the same
    command resumes from that checkpoint, steps 1..8 are logged once each, and the losses follow the uninterrupted
    run's (bf16 GPU kernels are not bit-reproducible: within 2 %)."""
    from conftest import write_color_dataset
    from test_distributed import losses

    from nvlm.distributed.dcp import complete_checkpoints
    from nvlm.training.config import RunConfig
    from nvlm.training.metrics import read_metrics
    from nvlm.training.trainer import Trainer

    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 24, 24)
    cfg = RunConfig.from_dict(
        {
            "model": {"arch": "H", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {
                "sources": [{"path": str(data / "images.jsonl")}, {"path": str(data / "text.jsonl")}],
                "max_seq_len": 256,
            },
            "train": {
                "stage": "sft",
                "max_steps": 8,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "lr": 3e-3,
                "save_every": 2,
                "bf16": True,
                "async_checkpoint": True,
            },
        }
    )
    quiet = lambda *a, **k: None  # noqa: E731
    Trainer(cfg, tmp_path / "straight", log=quiet).run()
    stopped = Trainer(cfg, tmp_path / "stopped", log=quiet)
    original = stopped.train_step

    def stop_after_4(batches):
        out = original(batches)
        if stopped.step == 3:  # the step being trained is the 4th
            stopped._stop = True
        return out

    stopped.train_step = stop_after_4  # type: ignore[method-assign]
    first = stopped.run()
    assert first.interrupted and first.steps == 4
    assert complete_checkpoints(tmp_path / "stopped" / "checkpoints")[-1].name == "step_0000004"
    second = Trainer(cfg, tmp_path / "stopped", log=quiet).run()
    assert second.steps == 8 and not second.interrupted
    assert [r["step"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")] == list(range(1, 9))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert all(abs(a - b) < 0.02 * b for a, b in zip(resumed, straight, strict=True)), (resumed, straight)
    assert straight[-1] < straight[0]


@pytest.mark.parametrize("masked", [True, False])
def test_xattn_runs_without_the_math_sdpa_kernel(masked):
    """The x-attn block's SDPA (grouped-query, with and without a row mask) runs on flash or memory-efficient
    kernels in bf16, forward and backward: restricted to those two, a math-only call would raise."""
    from test_gpu_readiness import xattn_block
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nvlm.models.xattn import xattn_mask

    block = xattn_block(heads=8, kv_heads=2).cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    memory = torch.randn(2, 48, 32, device="cuda", dtype=torch.bfloat16)
    allowed = row = None
    if masked:
        lo = torch.zeros(2, 64, dtype=torch.long, device="cuda")
        hi = torch.full((2, 64), 48, dtype=torch.long, device="cuda")
        hi[:, :5] = 0  # the first tokens come before the image: they see nothing
        allowed, row = xattn_mask(lo, hi, 48)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out, _ = block(x, memory, allowed, row)
        out.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all()


def test_packed_rows_train_with_flex_attention_on_gpu(backbones, tmp_path):
    """Packed SFT rows on CUDA run transformers' FlexAttention (block mask once per forward), forward and
    backward, and its loss equals the dense-mask SDPA loss of the same batch within bf16 noise."""
    from conftest import write_color_dataset

    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    (tmp_path / "data").mkdir()
    data = write_color_dataset(tmp_path / "data", 8, 8)
    cfg = RunConfig.from_dict(
        {
            "model": {"arch": "X", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {
                "sources": [{"path": str(data / "images.jsonl")}, {"path": str(data / "text.jsonl")}],
                "max_seq_len": 1024,
                "pack": True,
            },  # fmt: skip
            "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4, "lr": 1e-3},
        }
    )
    trainer = Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None)
    assert trainer.packed_kernel == "flex_attention"
    assert trainer.model.llm.config._attn_implementation == "flex_attention"
    (batch,) = trainer._read()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        flex = trainer.model(**batch, return_logits=False)
        trainer.model.llm.set_attn_implementation("sdpa")
        dense = trainer.model(**batch, return_logits=False)
        trainer.model.llm.set_attn_implementation("flex_attention")
    assert abs(float(flex.loss_sum) - float(dense.loss_sum)) < 0.02 * abs(float(dense.loss_sum))
    result = trainer.run()
    assert result.steps == 2
