"""``totals=Totals(groups, tokens)``: the same denominators as the alias keywords, refused twice or bad.

``fused_linear_wrpo_loss(..., totals=Totals(G, T))`` is ``num_groups=G, num_nll_tokens=T``, and
``fused_linear_nll_loss(..., totals=Totals(tokens=T))`` is ``num_tokens=T``: equal losses, log-probs,
metrics and gradients, bit for bit (what the denominators do is tested in test_accumulation.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch

import wrpo_kernels as wk
from wrpo_kernels import FusedLinearWRPOLoss, Totals, fused_linear_nll_loss, fused_linear_wrpo_loss

PREFERENCE = {"loss_type": "dpo", "beta": 0.3, "alpha": 0.2, "nll_weight": 0.4}


def _wrpo(batch, backend, module=False, **per_call):
    """(loss, logps, metrics, dX, dW, db) of the fused preference loss with ``per_call`` denominators."""
    h, w, b = batch.params()
    args = (h, w, batch.labels, batch.cu_seqlens)
    if module:
        out = FusedLinearWRPOLoss(backend=backend, **PREFERENCE)(*args, batch.ref_logps, b, **per_call)
    else:
        per_call.update(ref_logps=batch.ref_logps, bias=b, backend=backend)
        out = fused_linear_wrpo_loss(*args, **PREFERENCE, **per_call)
    out.loss.backward()
    return out.loss.detach(), out.logps, out.metrics, h.grad, w.grad, b.grad


def _nll(batch, **per_call):
    h, w, b = batch.params()
    loss, logps = fused_linear_nll_loss(
        h, w, batch.labels, batch.cu_seqlens, bias=b, backend="torch", **per_call
    )
    loss.backward()
    return loss.detach(), logps, h.grad, w.grad, b.grad


def _assert_equal(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            _assert_equal(list(x.values()), list(y.values()))
        else:
            assert torch.equal(x, y)


def test_totals_is_exported():
    assert wk.Totals is Totals and "Totals" in wk.__all__
    assert Totals() == (None, None)  # this call's own counts


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numbers", "tensors"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_wrpo_totals_equal_the_aliases(backend, as_tensor):
    batch = make_batch(B=2, K=3, H=5, V=17, seed=11, with_bias=True)
    groups, tokens = (torch.tensor(5.0), torch.tensor([23])) if as_tensor else (5, 23.0)
    want = _wrpo(batch, backend, num_groups=groups, num_nll_tokens=tokens)
    _assert_equal(_wrpo(batch, backend, totals=Totals(groups, tokens)), want)
    _assert_equal(_wrpo(batch, backend, module=True, totals=Totals(groups=groups, tokens=tokens)), want)
    _assert_equal(_wrpo(batch, backend, module=True, num_groups=groups, num_nll_tokens=tokens), want)
    # one field alone: the other mean keeps this call's own count
    _assert_equal(
        _wrpo(batch, backend, totals=Totals(groups=groups)), _wrpo(batch, backend, num_groups=groups)
    )
    _assert_equal(_wrpo(batch, backend, totals=Totals()), _wrpo(batch, backend))


def test_nll_totals_equal_the_alias():
    batch = make_batch(B=3, K=1, H=5, V=17, seed=12, with_bias=True)
    want = _nll(batch, num_tokens=40)
    _assert_equal(_nll(batch, totals=Totals(tokens=40)), want)
    _assert_equal(_nll(batch, totals=Totals(groups=7, tokens=40)), want)  # SFT has no group loss
    _assert_equal(_nll(batch, totals=Totals()), _nll(batch))


def test_totals_and_an_alias_together_are_refused():
    batch = make_batch(B=2, K=3, H=4, V=11, seed=13)
    args = (batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    for alias in ("num_groups", "num_nll_tokens"):
        with pytest.raises(ValueError, match=f"totals=.*{alias}="):
            fused_linear_wrpo_loss(*args, ref_logps=batch.ref_logps, totals=Totals(groups=2), **{alias: 2})
    with pytest.raises(ValueError, match="totals=.*num_tokens="):
        fused_linear_nll_loss(*args, totals=Totals(tokens=3), num_tokens=3)
    with pytest.raises(ValueError, match="totals=.*num_groups="):
        FusedLinearWRPOLoss()(*args, batch.ref_logps, totals=Totals(tokens=3), num_groups=2)


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), True, "4", torch.ones(2)])
@pytest.mark.parametrize("field", ["groups", "tokens"])
def test_bad_totals_are_named(field, bad):
    batch = make_batch(B=2, K=3, H=4, V=11, seed=14)
    args = (batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    totals = Totals(**{field: bad})
    with pytest.raises(ValueError, match=f"totals.{field} must be a"):
        fused_linear_wrpo_loss(*args, ref_logps=batch.ref_logps, totals=totals, backend="torch")
    with pytest.raises(ValueError, match=f"totals.{field} must be a"):
        fused_linear_nll_loss(*args, totals=totals, backend="torch")


def test_totals_must_be_a_totals():
    batch = make_batch(B=2, K=3, H=4, V=11, seed=15)
    with pytest.raises(ValueError, match="totals must be a wrpo_kernels.Totals, got tuple"):
        fused_linear_wrpo_loss(
            batch.hidden,
            batch.weight,
            batch.labels,
            batch.cu_seqlens,
            ref_logps=batch.ref_logps,
            totals=(2, 3),
        )
