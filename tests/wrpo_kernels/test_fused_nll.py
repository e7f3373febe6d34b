"""``fused_linear_nll_loss`` (SFT): micro-batch token counts, equality with the two-pass loss it replaces,
padded input, upstream gradients, refused inputs. Its parity with the full logits on every backend is in
tests/wrpo_kernels/parity/test_fused_nll_loss_parity.py."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, assert_rel_close, make_batch
from helpers.nll import full_logits_nll

from wrpo_kernels import fused_linear_nll_loss, linear_logprobs

TOL64 = 1e-12


def test_num_tokens_makes_micro_batches_sum_to_the_batch():
    """Two halves with the whole batch's token count: their losses and gradients add up to the whole's."""
    batch = make_batch(B=4, K=1, H=5, V=17, seed=5, max_len=7, ignore_frac=0.2, with_bias=False)
    cu = batch.cu_seqlens.tolist()
    n = int((batch.labels != IGNORE).sum())
    w = batch.weight.clone().requires_grad_(True)
    whole, _ = fused_linear_nll_loss(batch.hidden, w, batch.labels, batch.cu_seqlens, backend="torch")
    (g_whole,) = torch.autograd.grad(whole, w)
    total, grad = 0.0, torch.zeros_like(w)
    for s0, s1 in ((0, 2), (2, 4)):
        a, b = cu[s0], cu[s1]
        part_cu = batch.cu_seqlens[s0 : s1 + 1] - a
        loss, _ = fused_linear_nll_loss(
            batch.hidden[a:b], w, batch.labels[a:b], part_cu, backend="torch", num_tokens=torch.tensor(n)
        )
        total = total + loss.detach()
        grad += torch.autograd.grad(loss, w)[0]
    assert_rel_close(total, whole.detach(), TOL64, "loss")
    assert_rel_close(grad, g_whole, TOL64, "dW")


def test_equals_the_two_pass_logprobs_it_replaces():
    """The SFT loss before: -sum(linear_logprobs) / n with autograd (logits computed twice)."""
    batch = make_batch(B=2, K=2, H=6, V=23, seed=8, max_len=11, ignore_frac=0.3, with_bias=True)
    args = (batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    h1, w1, b1 = batch.params()
    two_pass = (
        -linear_logprobs(h1, w1, batch.labels, batch.cu_seqlens, bias=b1).sum()
        / (batch.labels != IGNORE).sum()
    )
    two_pass.backward()
    h2, w2, b2 = batch.params()
    loss, _ = fused_linear_nll_loss(h2, w2, *args[2:], bias=b2, chunk_tokens=4)
    loss.backward()
    assert_rel_close(loss, two_pass, TOL64, "loss")
    for ours, theirs, what in ((h2.grad, h1.grad, "dX"), (w2.grad, w1.grad, "dW"), (b2.grad, b1.grad, "db")):
        assert_rel_close(ours, theirs, TOL64, what)


def test_padded_input_equals_packed():
    batch = make_batch(B=3, K=1, H=4, V=13, seed=2, max_len=6, ignore_frac=0.2)
    hp, lp = batch.padded()
    packed, logps = fused_linear_nll_loss(batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    padded, logps_p = fused_linear_nll_loss(hp, batch.weight, lp)
    assert_rel_close(padded, packed, TOL64, "loss")
    assert_rel_close(logps_p, logps, TOL64, "logps")


def test_upstream_gradient_scales_and_a_second_backward_is_refused():
    batch = make_batch(B=2, K=1, H=4, V=11, seed=4)
    w = batch.weight.clone().requires_grad_(True)
    loss, _ = fused_linear_nll_loss(batch.hidden, w, batch.labels, batch.cu_seqlens, backend="torch")
    (3.0 * loss).backward(retain_graph=True)
    w_ref = batch.weight.clone().requires_grad_(True)
    expected, _ = full_logits_nll(batch.hidden, w_ref, None, batch.labels)
    (3.0 * expected).backward()
    assert_rel_close(w.grad, w_ref.grad, TOL64, "dW")
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_are_refused():
    batch = make_batch(B=2, K=1, H=4, V=11, seed=6)
    everything_ignored = torch.full_like(batch.labels, IGNORE)
    with pytest.raises(ValueError, match="no label != ignore_index=-100 in the batch"):
        fused_linear_nll_loss(batch.hidden, batch.weight, everything_ignored, batch.cu_seqlens)
    with pytest.raises(ValueError, match="num_tokens must be a positive number"):
        fused_linear_nll_loss(batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, num_tokens=0)
    unshifted = batch.labels.clone()
    unshifted[batch.cu_seqlens[1] - 1] = 1
    with pytest.raises(ValueError, match="the labels look unshifted"):
        fused_linear_nll_loss(batch.hidden, batch.weight, unshifted, batch.cu_seqlens)
