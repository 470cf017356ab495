"""How NVLM-X/H wire their gated cross-attention blocks into the LLM (paper §4.3): explicitly, as
``CrossAttentionDecoderLayer``s that run block → layer, with the image memory passed as an argument.

Specified here: activation checkpointing gives the gradients of the plain step for every trainable tensor
(D, X, H) and recomputes the blocks; checkpoints saved before the blocks were wired this way still load and
give the same logits; the backbone keeps its own parameter names on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import picture, set_gates
from safetensors import safe_open
from safetensors.torch import load_file

import nvlm
from nvlm.models.llm import decoder_layers
from nvlm.models.xattn import CrossAttentionDecoderLayer
from nvlm.training.build import activation_checkpointing
from nvlm.training.stages import apply_stage

ASSET = Path(__file__).parent / "assets" / "nvlm-x-before-wrapping"


def _batch(processor):
    """Two samples with an image each and a trained answer (right padded, as in training)."""
    proc = processor
    samples = [
        proc.encode_segments(
            [("<image>\nWhat color is it?", False), (" red and blue", True)], [picture(150, 100, seed=1)]
        ),
        proc.encode_segments([("Look: <image>\nAnd?", False), (" green", True)], [picture(56, 56, seed=2)]),
    ]
    return proc.collate(samples, padding_side="right")


def _grads(model, batch) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    (out.loss_sum / out.num_tokens).backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_activation_checkpointing_gives_the_plain_gradients(build_model, arch):
    model, processor = build_model(arch, xattn__every=2)
    set_gates(model, 0.7)  # open gates: the blocks take part in every gradient
    apply_stage(model, "sft")
    model.train()
    batch = _batch(processor)
    plain = _grads(model, batch)
    activation_checkpointing(model)
    recomputed = _grads(model, batch)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    missing = [n for n in plain if plain[n] is None or recomputed[n] is None]
    assert not missing, f"trainable tensors without a gradient: {missing[:5]}"
    worst = max((plain[n] - recomputed[n]).abs().max().item() for n in plain)
    assert worst <= 1e-6, f"largest gradient difference with activation checkpointing: {worst}"
    if arch != "D":
        assert all(recomputed[n].abs().sum() > 0 for n in recomputed if n.startswith("xattn."))


def test_checkpointing_recomputes_each_block_with_its_layer(build_model):
    model, processor = build_model("X", xattn__every=2)
    set_gates(model, 0.7)
    apply_stage(model, "pretrain")
    model.train()
    calls = []
    for i, block in enumerate(model.xattn):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))  # counting only
    batch = _batch(processor)
    _grads(model, batch)
    assert sorted(calls) == [0, 1]  # once per block without checkpointing
    calls.clear()
    activation_checkpointing(model)
    _grads(model, batch)
    assert sorted(calls) == [0, 0, 1, 1]  # forward, then again in backward: the block is recomputed
    # and a training forward keeps no block's K/V (only a decoding cache does): checkpointing frees them
    assert model(**batch).xattn_state.kv == {}
    model.eval()
    with torch.no_grad():
        assert sorted(model(**batch, use_cache=True).xattn_state.kv) == [0, 1]


def test_blocks_are_explicit_layers_not_hooks(build_model):
    model, processor = build_model("H", xattn__every=2)
    layers = decoder_layers(model.llm)
    wrapped = [i for i, layer in enumerate(layers) if isinstance(layer, CrossAttentionDecoderLayer)]
    assert wrapped == model.xattn_layers == [0, 2]
    assert all(layers[i].block is model.xattn[k] for k, i in enumerate(wrapped))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.llm.modules())
    # the block is owned once, by NVLM.xattn: its parameters are not also the LLM's
    llm_params = {id(p) for p in model.llm.parameters()}
    assert not any(id(p) in llm_params for p in model.xattn.parameters())


def test_backbone_keeps_its_parameter_names_on_disk(build_model, tmp_path):
    model, processor = build_model("X", xattn__every=2)
    set_gates(model, 0.4)
    model.save_pretrained(tmp_path / "x")
    processor.save_pretrained(tmp_path / "x")
    with safe_open(str(tmp_path / "x" / "llm" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.mlp.up_proj.weight" in names and not any(".layer." in n for n in names)
    assert sorted(load_file(str(tmp_path / "x" / "model.safetensors"))) == sorted(
        k for k in model.state_dict() if k.startswith(("projector.", "xattn."))
    )
    again, again_proc = nvlm.load(tmp_path / "x")
    batch = processor("<image>\nWhat?", [picture(120, 60)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_a_checkpoint_saved_before_the_change_loads_with_the_same_logits():
    from PIL import Image

    model, processor = nvlm.load(ASSET)
    assert model.xattn[0].gate_attn.item() == 0.5  # the saved blocks, not fresh ones
    batch = processor("<image>\nWhat color?", [Image.new("RGB", (112, 56), (200, 30, 40))])
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(
        logits, load_file(str(ASSET / "expected_logits.safetensors"))["logits"], rtol=0, atol=1e-5
    )


def test_a_block_cut_off_the_graph_is_an_error_not_zero_gradients(build_model, monkeypatch):
    from nvlm.training.micro_batch import fill_unused_grads

    model, processor = build_model("X", xattn__every=2)
    apply_stage(model, "sft")
    model.train()
    batch = _batch(processor)
    # a wiring bug: the layers stop calling their blocks although the batch has an image memory
    monkeypatch.setattr(
        CrossAttentionDecoderLayer, "_block_then_layer", lambda self, h, *a, xattn=None, **k: self.layer(h, *a, **k)
    )
    _grads(model, batch)
    with pytest.raises(RuntimeError, match=r"got no gradient.*'xattn\.0\.gate_attn'"):
        fill_unused_grads(model, {"llm": True, "projector": True, "vision": True, "xattn": True})
    # a step whose batches had no image anywhere: zero gradients for projector and blocks are legitimate
    _grads(model, batch)
    params = fill_unused_grads(model, {"llm": True, "projector": False, "vision": False, "xattn": False})
    assert all(p.grad is not None for p in params)
    assert all(not b.gate_attn.grad.any() for b in model.xattn)


def test_grouped_kv_attention_equals_the_repeated_heads_bitwise():
    """The block hands grouped K/V to SDPA (enable_gqa) instead of copying each head per query head: same
    outputs and gradients, bit for bit, as the repeat_interleave it replaced."""
    import torch.nn.functional as F

    from nvlm.models.llm import LLMDims
    from nvlm.models.xattn import GatedCrossAttentionBlock, xattn_mask

    torch.manual_seed(0)
    dims = LLMDims(
        hidden_size=32, ffn_size=48, num_heads=4, num_kv_heads=2, head_dim=8, num_layers=2, rms_norm_eps=1e-6
    )
    block = GatedCrossAttentionBlock(dims)
    with torch.no_grad():
        block.gate_attn.fill_(0.7)
    x, memory = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 9, 32)
    allowed, row = xattn_mask(torch.zeros(2, 5, dtype=torch.long), torch.tensor([[9] * 5, [4] * 5]), 9)
    out, (k, v) = block(x, memory, allowed, row)
    (gx,) = torch.autograd.grad(out.sum(), x)

    def repeated(x):  # the attention half of the block with K/V heads copied, as before
        q = block.q_norm(block.q_proj(block.input_norm(x)).view(2, 5, 4, 8)).transpose(1, 2)
        kk, vv = k.detach().repeat_interleave(2, 1), v.detach().repeat_interleave(2, 1)
        a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed[:, None])
        return x + torch.tanh(block.gate_attn) * block.o_proj(a.transpose(1, 2).reshape(2, 5, -1)) * row

    x2 = x.detach().clone().requires_grad_()
    h = repeated(x2)
    n = block.post_norm(h)
    ref = h + torch.tanh(block.gate_ffn) * block.down_proj(F.silu(block.gate_proj(n)) * block.up_proj(n)) * row
    (gx2,) = torch.autograd.grad(ref.sum(), x2)
    assert torch.equal(out, ref)
    assert torch.equal(gx, gx2)
