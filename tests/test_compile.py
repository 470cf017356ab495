"""train.compile in a one-process run, and compiled packed rows.

python -m pytest tests/test_compile.py -q

torch.compile's "aot_eager" backend (no C compiler, seconds per graph; NVLM_TEST_COMPILE_BACKEND=inductor runs
the default backend): a single-process trainer compiles what ``compile_targets`` names (before, the option was
read only by sharded runs), whole decoder layers unless a layer checkpoints itself, with the eager step's loss
and gradients; packed rows with a different number of samples per batch reuse the compiled graphs instead of
recompiling until dynamo gives up and runs the layer eagerly.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import picture, write_color_dataset
from torch._dynamo.utils import counters

from nvlm.data.formats import Conversation, chatml_segments
from nvlm.data.packing import collate_packed
from nvlm.distributed.parallel import compile_blocks, compile_targets
from nvlm.models.llm import decoder_layers
from nvlm.models.packed_attention import use_packed_attention
from nvlm.models.xattn import CrossAttentionDecoderLayer
from nvlm.training.build import activation_checkpointing
from nvlm.training.config import RunConfig
from nvlm.training.trainer import Trainer


@pytest.fixture(autouse=True)
def backend(monkeypatch):
    monkeypatch.setenv("NVLM_COMPILE_BACKEND", os.environ.get("NVLM_TEST_COMPILE_BACKEND", "aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(tmp_path_factory.mktemp("compile-data"), 4, 4)


def trainer(backbones, dataset, out, arch, compile):
    cfg = RunConfig.from_dict(
        {
            "model": {"arch": arch, "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
            "data": {"sources": [{"path": str(dataset / "images.jsonl")}], "max_seq_len": 256},
            "train": {"max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1, "compile": compile},
        }
    )
    t = Trainer(cfg, out, log=lambda *a, **k: None, progress=False)
    with torch.no_grad():
        for block in t.model.xattn:  # open the gates: the blocks are on the gradient path
            block.gate_attn.fill_(0.5)
            block.gate_ffn.fill_(0.5)
    return t


def is_compiled(module: torch.nn.Module) -> bool:
    return hasattr(module.forward, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("arch", ["D", "X"])
def test_one_process_run_compiles_whole_layers_with_the_eager_gradients(backbones, dataset, tmp_path, arch):
    eager = trainer(backbones, dataset, tmp_path / "eager", arch, compile=False)
    compiled = trainer(backbones, dataset, tmp_path / "compiled", arch, compile=True)
    targets = compile_targets(compiled.model)
    layers = [m.layer if isinstance(m, CrossAttentionDecoderLayer) else m for m in decoder_layers(compiled.model.llm)]
    vision = [*compiled.model.vision.layers, compiled.model.projector]
    assert len(vision) > 1  # the tower's layers (frozen, but run every step) and the trained projector
    assert targets == [*layers, *compiled.model.xattn, *vision]  # no checkpointing: each layer whole, each block
    assert all(is_compiled(m) for m in targets) and not any(is_compiled(m) for m in compile_targets(eager.model))

    proc = eager.processor
    enc = proc.encode_segments([("<image>\nWhat color? ", False), ("red", True)], [picture(150, 100)])
    batch = proc.collate([enc], padding_side="right")
    loss_eager, _, _ = eager.train_step([batch])
    grads_eager = {n: p.grad.clone() for n, p in eager.model.named_parameters() if p.grad is not None}
    loss, _, _ = compiled.train_step([batch])
    grads = {n: p.grad for n, p in compiled.model.named_parameters() if p.grad is not None}
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced them (layers of a class share graphs)
    assert loss == pytest.approx(loss_eager, rel=1e-5)
    assert grads.keys() == grads_eager.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_layers_compile_attention_and_mlp_only(build_model):
    model, processor = build_model("H", config={"xattn.every": 2})  # blocks before layers 0 and 2 of 4
    model.train()
    activation_checkpointing(model)
    wrapped = [m for m in decoder_layers(model.llm) if isinstance(m, CrossAttentionDecoderLayer)]
    plain = [m for m in decoder_layers(model.llm) if not isinstance(m, CrossAttentionDecoderLayer)]
    assert wrapped and plain
    targets = compile_targets(model)
    for m in plain:  # checkpointed by transformers inside its class-level forward: compiled inside that
        assert m not in targets and m.self_attn in targets and m.mlp in targets
    for m in wrapped:  # the wrapper checkpoints around its layer: the layer is compiled whole
        assert m.layer in targets
    assert all(b in targets for b in model.xattn)


def conversation(words: int) -> Conversation:
    return Conversation(
        [{"role": "user", "content": "Say " + "hi " * words}, {"role": "assistant", "content": "ok " * (words % 3 + 1)}]
    )


@pytest.mark.slow
def test_packed_rows_with_new_sample_counts_reuse_the_compiled_graphs(build_model):
    model, processor = build_model("D")
    model.train()
    eager, eager_proc = build_model("D")
    eager.train()
    for m in (model, eager):
        use_packed_attention(m.llm)  # per-sample SDPA over packed rows (the CPU default for packing)
    compile_blocks(model)
    proc = processor
    graphs = []
    for i in range(6):  # 2 … 7 packed samples over two rows, longer each time
        samples = [proc.encode_segments(chatml_segments(conversation(i + j)), []) for j in range(2 + i)]
        batch = collate_packed([samples[: 1 + i // 2], samples[1 + i // 2 :]], 0, proc.tokens_per_tile)
        out = model(**batch, return_logits=False, packed=True)
        (out.loss_sum / out.num_tokens).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    # the first three batches settle the dynamic shapes; after that a new number of samples (traced, the
    # per-sample loop would be unrolled per count) and a new length compile nothing more
    assert graphs[2] > 0 and graphs[-1] == graphs[2], graphs
    with torch.no_grad():
        loss, loss_eager = (m(**batch, return_logits=False, packed=True).loss_sum for m in (model, eager))
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_images_with_new_tile_counts_reuse_the_compiled_vision_layers(build_model):
    model, processor = build_model("D")
    model.train()
    eager, eager_proc = build_model("D")
    eager.train()
    compile_blocks(model)
    assert all(is_compiled(m) for m in [*model.vision.layers, model.projector])
    proc, size = processor, model.vision.tile_size
    graphs, tiles = [], []
    for cols in range(1, 6):  # a 1×cols grid of tiles (+ a thumbnail past one): a new tile count each batch
        enc = proc.encode_segments([("<image>\nWhat? ", False), ("ok", True)], [picture(cols * size, size, cols)])
        batch = proc.collate([enc], padding_side="right")
        out = model(**batch, return_logits=False)
        (out.loss_sum / out.num_tokens).backward()
        graphs.append(counters["stats"]["unique_graphs"])
        tiles.append(batch["pixel_values"].shape[0])
    assert len(set(tiles)) == 5, tiles
    # the first counts settle the dynamic tile dimension; later ones (and their new lengths) compile nothing
    assert graphs[2] > 0 and graphs[-1] == graphs[2], graphs
    with torch.no_grad():
        loss, loss_eager = (m(**batch, return_logits=False).loss_sum for m in (model, eager))
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=0)
