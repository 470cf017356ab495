"""The training loss without full logits (``nvlm.models.nvlm.labelled_loss``): the LM head runs only where the
next token has a label, in chunks recomputed in backward. Same loss and gradients as the full-logits path."""

from __future__ import annotations

import pytest
import torch
from conftest import set_gates
from test_xattn_wiring import _batch

from nvlm.training.stages import apply_stage


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    (out.loss_sum / out.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", ["D", "X", "H"])
@pytest.mark.parametrize("chunk", [4096, 3])  # one chunk, and many (recomputed in backward)
def test_labelled_loss_equals_the_full_logits_loss(build_model, arch, chunk):
    model, processor = build_model(arch, xattn__every=2)
    set_gates(model, 0.5)
    apply_stage(model, "sft")
    model.train()
    model.loss_chunk_tokens = chunk
    batch = _batch(processor)
    full, full_grads = _loss_and_grads(model, batch)
    fast, fast_grads = _loss_and_grads(model, batch, return_logits=False)
    assert fast.logits is None and full.logits is not None
    assert fast.num_tokens == full.num_tokens > chunk or chunk == 4096
    torch.testing.assert_close(fast.loss_sum, full.loss_sum, rtol=1e-6, atol=0)
    assert fast_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, g in full_grads.items():  # chunks sum in another order: rounding at the gradient's own scale
        torch.testing.assert_close(
            fast_grads[name], g, rtol=1e-5, atol=max(1e-7, 1e-6 * float(g.abs().max())), msg=name
        )
