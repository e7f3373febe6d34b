"""The autograd functions are first-order only: a second derivative taken through them raises.

Their backwards return gradients computed from saved constants (the fused loss even computes them in
its forward), so autograd could not differentiate them again; ``once_differentiable`` makes an attempt
raise instead of silently returning a gradient without a graph (or one missing d2L/ds2). The reference
backend is plain autograd and does have second derivatives: the first-order gradients of both agree.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, make_batch

from wrpo_kernels import fused_linear_wrpo_loss, linear_logprobs, wrpo_loss

TWICE = r"differentiate twice|once_differentiable"
BACKENDS = ["torch", "reference"]


@pytest.fixture
def batch():
    return make_batch(B=2, K=3, H=6, V=23, seed=2, min_len=2, max_len=5, with_bias=True)


def fused_loss(batch, backend, h, w, b):
    return fused_linear_wrpo_loss(
        h,
        w,
        batch.labels,
        batch.cu_seqlens,
        bias=b,
        ref_logps=batch.ref_logps,
        backend=backend,
        beta=0.5,
        nll_weight=0.2,
    ).loss


def logprobs_loss(batch, backend, h, w, b):
    lp = linear_logprobs(h, w, batch.labels, batch.cu_seqlens, bias=b, backend=backend, reduction="mean")
    return (lp * torch.linspace(0.5, 1.5, lp.numel(), dtype=lp.dtype)).sum()


HEAD_LOSSES = {"fused": fused_loss, "logprobs": logprobs_loss}


def first_order(loss_fn, batch, backend, *, create_graph):
    h, w, b = batch.params()
    grads = torch.autograd.grad(loss_fn(batch, backend, h, w, b), (h, w, b), create_graph=create_graph)
    return grads


@pytest.mark.parametrize("which", HEAD_LOSSES)
def test_second_derivative_through_the_head_raises(which, batch):
    h, w, b = batch.params()
    grads = torch.autograd.grad(HEAD_LOSSES[which](batch, "torch", h, w, b), (h, w, b), create_graph=True)
    for name, g in zip(("dX", "dW", "db"), grads, strict=True):
        assert g.requires_grad, f"{name}: detached, so a second derivative would silently be missing"
        with pytest.raises(RuntimeError, match=TWICE):
            (g * g).sum().backward()


@pytest.mark.parametrize("which", HEAD_LOSSES)
def test_gradient_penalty_raises_instead_of_losing_its_second_order_part(which, batch):
    h, w, b = batch.params()
    loss = HEAD_LOSSES[which](batch, "torch", h, w, b)
    (dX,) = torch.autograd.grad(loss, (h,), create_graph=True)
    # the fused loss may also report that its single-use backward ran twice: an error either way
    match = TWICE if which == "logprobs" else TWICE + "|backward ran twice"
    with pytest.raises(RuntimeError, match=match):
        (loss + (dX * dX).sum()).backward()


@pytest.mark.parametrize("which", HEAD_LOSSES)
def test_first_order_gradients_unchanged_and_match_reference(which, batch):
    plain = first_order(HEAD_LOSSES[which], batch, "torch", create_graph=False)
    graph = first_order(HEAD_LOSSES[which], batch, "torch", create_graph=True)
    reference = first_order(HEAD_LOSSES[which], batch, "reference", create_graph=True)
    for name, p, g, r in zip(("dX", "dW", "db"), plain, graph, reference, strict=True):
        assert torch.equal(p, g.detach()), name
        assert_rel_close(p, r, 1e-10, name)


@pytest.mark.parametrize("which", HEAD_LOSSES)
def test_reference_backend_has_second_derivatives(which, batch):
    """The oracle differentiates twice (so a test of a Hessian-vector product has something to compare to)."""
    h, w, b = batch.params()
    (dX,) = torch.autograd.grad(HEAD_LOSSES[which](batch, "reference", h, w, b), (h,), create_graph=True)
    (dX * dX).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def preference_inputs(B=3, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (B, K), generator=g)
    ref = -2.5 * lengths + torch.randn(B, K, generator=g, dtype=torch.float64)
    policy = ref + 3 * torch.randn(B, K, generator=g, dtype=torch.float64)
    return policy, ref, lengths


@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
def test_wrpo_loss_second_derivative_raises(loss_type):
    """d2L/ds2 depends on s (sigmoid' or the ipo square): the saved dL/ds is not a constant to it."""
    policy, ref, lengths = preference_inputs()
    p = policy.clone().requires_grad_()
    r = None if loss_type == "simpo" else ref.clone().requires_grad_()
    loss, _ = wrpo_loss(p, r, lengths, loss_type=loss_type, beta=0.3, backend="torch")
    grads = torch.autograd.grad(loss, [t for t in (p, r) if t is not None], create_graph=True)
    for g in grads:
        with pytest.raises(RuntimeError, match=TWICE):
            (g * g).sum().backward()


def test_wrpo_loss_gradient_penalty_raises():
    policy, ref, lengths = preference_inputs(seed=3)
    p = policy.clone().requires_grad_()
    loss, _ = wrpo_loss(p, ref, lengths, loss_type="ipo", beta=0.3, backend="torch")
    (dp,) = torch.autograd.grad(loss, (p,), create_graph=True)
    with pytest.raises(RuntimeError, match=TWICE):
        (loss + (dp * dp).sum()).backward()


@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
def test_wrpo_loss_first_order_unchanged_and_matches_reference(loss_type):
    policy, ref, lengths = preference_inputs(seed=1)
    refs = None if loss_type == "simpo" else ref
    out = {}
    for backend in BACKENDS:
        for create_graph in (False, True):
            p = policy.clone().requires_grad_()
            loss, _ = wrpo_loss(p, refs, lengths, loss_type=loss_type, beta=0.3, backend=backend)
            (dp,) = torch.autograd.grad(loss, (p,), create_graph=create_graph)
            out[backend, create_graph] = dp.detach()
    assert torch.equal(out["torch", False], out["torch", True])
    assert_rel_close(out["torch", False], out["reference", False], 1e-10, "d policy")
    # the reference's second derivative exists and is not zero (what once_differentiable protects)
    p = policy.clone().requires_grad_()
    loss, _ = wrpo_loss(p, refs, lengths, loss_type=loss_type, beta=0.3, backend="reference")
    (dp,) = torch.autograd.grad(loss, (p,), create_graph=True)
    (hvp,) = torch.autograd.grad(dp.sum(), (p,))
    assert hvp.abs().sum() > 0
