"""``fused_linear_nll_loss`` (SFT) on every backend against an fp64 computation from the full logits:
the mean NLL, per-sequence log-probs and the gradients of hidden, weight and bias, with odd shapes,
chunks cutting sequences, soft cap, temperature, bias and ignored rows."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, assert_rel_close, make_batch
from helpers.backends import BACKENDS
from helpers.nll import full_logits_nll

from wrpo_kernels import fused_linear_nll_loss

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def backends():
    out = []
    for backend in BACKENDS:
        reason = backend.skip_reason
        out.append(
            pytest.param(
                backend, id=backend.id, marks=[pytest.mark.skip(reason=str(reason))] if reason else []
            )
        )
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("chunk_tokens", [None, 1, 5])
@pytest.mark.parametrize(
    "head", [{}, {"softcap": 2.5, "temperature": 0.7}], ids=["plain", "softcap-temperature"]
)
def test_values_and_gradients_equal_the_full_logits(backend, chunk_tokens, head):
    batch = backend.on_device(
        make_batch(B=3, K=1, H=7, V=29, seed=3, min_len=1, max_len=9, ignore_frac=0.25, with_bias=True)
    )
    tol = TOL[backend.dtype]
    opts = dict(head)
    if backend.chunked:
        opts["chunk_tokens"] = chunk_tokens
    h, w, b = batch.params(backend.dtype)
    with backend.calls():
        loss, logps = fused_linear_nll_loss(
            h, w, batch.labels, batch.cu_seqlens, bias=b, backend=backend.name, **opts
        )
        loss.backward()
    dX, dW, db = h.grad, w.grad, b.grad

    h, w, b = batch.params()
    expected, picked = full_logits_nll(h, w, b, batch.labels, **head)
    expected.backward()
    where = picked.device
    seq = torch.repeat_interleave(
        torch.arange(batch.S, device=where), torch.tensor(batch.seqlens, device=where)
    )
    sums = torch.zeros(batch.S, dtype=torch.float64, device=where).index_add(0, seq, picked.detach())
    assert_rel_close(loss, expected, tol, "loss")
    assert_rel_close(logps, sums, tol, "logps")
    assert not logps.requires_grad
    assert_rel_close(dX, h.grad, tol, "dX")
    assert_rel_close(dW, w.grad, tol, "dW")
    assert_rel_close(db, b.grad, tol, "db")
    assert dX[batch.labels == IGNORE].abs().max() == 0  # ignored rows get no gradient
