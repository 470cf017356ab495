"""What a GPU cluster needs that a CPU can show: reference runs stay on the CPU on a GPU box, the device check's
scripts start and refuse what they should, disk-full saves fail in one line (nvlm.distributed.dcp).

python -m pytest tests/test_gpu_readiness.py -q
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import wants_gpu, write_color_dataset

from nvlm.errors import UserError
from nvlm.training.config import RunConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("data"), 8, 4)


def cfg(backbones, dataset, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"arch": "X", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": [{"path": str(dataset / "images.jsonl")}], "max_seq_len": 256},
            "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2, **train},
        }
    )


# ---- reference runs on a GPU machine ------------------------------------------------------------------------
def test_suite_hides_cuda_unless_gpu_tests_are_asked_for():
    assert wants_gpu("gpu") and wants_gpu("gpu and not slow") and wants_gpu("(gpu or slow)")
    assert not wants_gpu("") and not wants_gpu("not gpu") and not wants_gpu("slow")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # this session was not started with -m gpu
    assert not torch.cuda.is_available()


def test_cpu_device_keeps_a_run_on_the_cpu_in_fp32_where_cuda_is_visible(backbones, dataset, tmp_path, monkeypatch):
    from nvlm.distributed.parallel import use_cuda
    from nvlm.training.trainer import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_cuda("auto") and use_cuda("cuda") and not use_cuda("cpu")
    trainer = Trainer(cfg(backbones, dataset, device="cpu", bf16=True), tmp_path / "run", log=lambda *a: None)
    assert trainer.device.type == "cpu"
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in trainable)
    autocasts = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: autocasts.append(a) or pytest.fail("autocast on CPU"))
    loss, _ = trainer.optimizer_step(trainer._read())  # one step, no save (DCP asks torch.cuda itself)
    assert trainer.step == 1 and loss > 0 and not autocasts


def test_cuda_device_without_a_gpu_is_a_clear_error(monkeypatch):
    from nvlm.distributed.parallel import use_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_cuda("auto")
    with pytest.raises(UserError, match="train.device=cuda but no CUDA GPU"):
        use_cuda("cuda")


# ---- a full disk during a checkpoint ------------------------------------------------------------------------
def fill_disk_at(monkeypatch, step: int, error: BaseException) -> None:
    """DCP's file writer raises `error` while writing any checkpoint of `step` (as a full disk makes it do)."""
    import torch.distributed.checkpoint.filesystem as filesystem

    original = filesystem._write_item

    def write(*args, **kwargs):
        if any(f"step_{step:07d}" in str(a) for a in [*args, *kwargs.values()]):
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", write)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_full_is_one_line_and_the_previous_checkpoint_resumes(
    backbones, dataset, tmp_path, monkeypatch, asynchronous
):
    import errno

    from nvlm.distributed.dcp import DiskFull, complete_checkpoints
    from nvlm.training.trainer import Trainer

    run = cfg(backbones, dataset, max_steps=4, save_every=2, async_checkpoint=asynchronous)
    quiet = lambda *a, **k: None  # noqa: E731
    with monkeypatch.context() as m:
        fill_disk_at(m, 4, OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(DiskFull) as caught:
            Trainer(run, tmp_path / "run", log=quiet).run()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("disk full: checkpoint of step 4")
    assert str(tmp_path / "run" / "checkpoints") in message and message.endswith("resume from it")
    assert "the last complete checkpoint is " + str(tmp_path / "run" / "checkpoints" / "step_0000002") in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000002"]  # the torn one gone
    resumed = Trainer(run, tmp_path / "run", log=quiet)
    resumed.resume()
    assert resumed.step == 2
    assert resumed.run().steps == 4
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step_0000004"


def test_a_torn_zip_write_counts_as_disk_full_only_when_the_disk_is_nearly_full(
    backbones, dataset, tmp_path, monkeypatch
):
    """torch's zip writer loses the errno ("unexpected pos …", as a 6 MB tmpfs gives): judged by the free space."""
    import nvlm.distributed.dcp as dcp
    from nvlm.training.trainer import Trainer

    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    run = cfg(backbones, dataset, max_steps=1, async_checkpoint=False)
    fill_disk_at(monkeypatch, 1, torn)
    with pytest.raises(BaseException, match="unexpected pos") as caught:  # DCP's CheckpointException, unchanged
        Trainer(run, tmp_path / "roomy", log=lambda *a, **k: None).run()
    assert not isinstance(caught.value, dcp.DiskFull)
    monkeypatch.setattr(dcp, "_free_bytes", lambda where: 2**20)
    with pytest.raises(dcp.DiskFull, match="no complete checkpoint yet"):
        Trainer(run, tmp_path / "full", log=lambda *a, **k: None).run()


# ---- x-attn SDPA: no boolean mask together with enable_gqa ---------------------------------------------------
def xattn_block(heads: int = 4, kv_heads: int = 2):
    from nvlm.models.llm import LLMDims
    from nvlm.models.xattn import GatedCrossAttentionBlock

    block = GatedCrossAttentionBlock(LLMDims(32, 64, heads, kv_heads, 8, 2, 1e-6))
    with torch.no_grad():
        block.gate_attn.fill_(0.7)
        block.gate_ffn.fill_(-0.4)
    return block


def test_masked_gqa_xattn_equals_the_enable_gqa_call(monkeypatch):
    """K/V repeated to every head with the mask (what CUDA's memory-efficient kernel takes) = SDPA's own GQA with
    the mask (which sends CUDA to the math kernel), forward and gradients; without a mask SDPA's GQA stays."""
    import torch.nn.functional as F

    from nvlm.models.xattn import xattn_mask

    block, x, memory = xattn_block(), torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    lo, hi = torch.tensor([[0, 0, 0, 2, 2, 5, 0], [0, 1, 1, 1, 0, 0, 0]]), torch.tensor([[0, 3, 3, 5, 5, 5, 5]] * 2)
    allowed, row = xattn_mask(lo, hi, 5)
    calls: list[dict] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, enable_gqa=False):
        calls.append({"mask": attn_mask is not None, "gqa": enable_gqa, "kv_heads": k.shape[1]})
        return sdpa(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)

    def old(q, k, v, attn_mask=None, enable_gqa=False):  # the call before: the 2 K/V heads, mask and enable_gqa
        return sdpa(q, k[:, ::2], v[:, ::2], attn_mask=attn_mask, enable_gqa=True)  # un-repeat [k0 k0 k1 k1]

    results = []
    for attention in (spy, old):
        monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out, _ = block(xi, memory, allowed, row)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, block.q_proj.weight.grad.clone(), block.k_proj.weight.grad.clone()))
    assert calls[0] == {"mask": True, "gqa": False, "kv_heads": 4}
    for new, before in zip(*results, strict=True):
        torch.testing.assert_close(new, before, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    block(x, memory, None, None)
    assert calls[-1] == {"mask": False, "gqa": True, "kv_heads": 2}


# ---- labelled rows and the image-pad count: host work in the trainer ----------------------------------------
@pytest.mark.parametrize("arch", ["D", "X"])
def test_the_trainer_does_the_label_and_pad_work_on_the_host_and_the_loss_is_unchanged(
    backbones, dataset, tmp_path, monkeypatch, arch
):
    """Under FSDP the inputs reach the model on the GPU: the labelled rows (a ``nonzero``) and the image-pad count
    are made on the host by the trainer, so the model's forward runs neither; the loss is the same to the bit."""
    from nvlm.training.micro_batch import with_host_work
    from nvlm.training.trainer import Trainer

    run = cfg(backbones, dataset, micro_batch_size=2)
    run.model.arch = arch
    trainer = Trainer(run, tmp_path / "run", log=lambda *a, **k: None)
    model, (batch,) = trainer.model, trainer._read()
    with torch.no_grad():
        before = model(**batch, return_logits=False)
    prepared = with_host_work(batch, model)
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("nonzero in the forward"))
    monkeypatch.setattr(type(model), "check_image_pads", lambda *a, **k: pytest.fail("pads counted in the forward"))
    with torch.no_grad():
        after = model(**prepared, return_logits=False)
    assert before.num_tokens == after.num_tokens > 0
    assert torch.equal(before.loss_sum, after.loss_sum)


def test_mfu_peak_is_known_for_pcie_and_nvl_boards():
    from nvlm.training.flops import peak_by_name

    assert peak_by_name("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_by_name("NVIDIA H100 NVL") == peak_by_name("NVIDIA H200 NVL") == 835e12
    assert peak_by_name("NVIDIA H200") == 989e12 and peak_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_by_name("NVIDIA GeForce RTX 4090") is None


def test_a_given_one_process_world_follows_train_device(monkeypatch):
    """``nvlm train`` (one process) hands the trainer a CUDA world on a GPU machine: train.device=cpu moves it."""
    from nvlm.distributed.parallel import World
    from nvlm.training.trainer import pinned

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = World(device=torch.device("cuda"))
    assert pinned(cuda, "cpu").device.type == "cpu" and pinned(cuda, "auto") is cuda
    assert pinned(None, "auto").device.type == "cuda" and pinned(None, "cpu").device.type == "cpu"
    sharded = World(device=torch.device("cuda", 0), distributed=True, size=2)
    with pytest.raises(ValueError, match="train.device=cpu but the process group runs on cuda"):
        pinned(sharded, "cpu")
