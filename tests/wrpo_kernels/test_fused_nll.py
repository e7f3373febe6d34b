"""``fused_linear_nll_loss`` (SFT): the single-pass head + mean NLL against an fp64 computation from the
full logits, values and gradients, on every backend (torch with and without the native kernels,
Triton under the interpreter, the reference), with odd shapes, chunks cutting sequences, soft cap,
temperature, bias and ignored rows."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import IGNORE, assert_rel_close, make_batch

from wrpo_kernels import fused_linear_nll_loss, linear_logprobs, native
from wrpo_kernels.api import triton_unavailable_reason

TOL64 = 1e-12
TOL32 = 2e-5


def full_logits_nll(hidden, weight, bias, labels, *, softcap=None, temperature=1.0, num_tokens=None):
    """-(sum_t log softmax(logits_t)[label_t]) / n and per-token log-probs [N], from fp64 logits."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    valid = labels != IGNORE
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1) * valid
    n = valid.sum() if num_tokens is None else num_tokens
    return -picked.sum() / n, picked


def backends():
    out = [("torch", None), ("torch", "no-native"), ("reference", None)]
    if triton_unavailable_reason(torch.device("cpu")) is None:
        out.append(("triton", None))
    return out


def run(batch, backend, variant, dtype, **opts):
    h, w, b = batch.params(dtype)
    with native.disabled() if variant == "no-native" else contextlib.nullcontext():
        loss, logps = fused_linear_nll_loss(
            h, w, batch.labels, batch.cu_seqlens, bias=b, backend=backend, **opts
        )
        loss.backward()
    return loss, logps, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize(("backend", "variant"), backends())
@pytest.mark.parametrize("chunk_tokens", [None, 1, 5])
@pytest.mark.parametrize(
    "head", [{}, {"softcap": 2.5, "temperature": 0.7}], ids=["plain", "softcap-temperature"]
)
def test_values_and_gradients_equal_the_full_logits(backend, variant, chunk_tokens, head):
    batch = make_batch(B=3, K=1, H=7, V=29, seed=3, min_len=1, max_len=9, ignore_frac=0.25, with_bias=True)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = TOL32 if dtype == torch.float32 else TOL64
    opts = dict(head)
    if backend != "reference":
        opts["chunk_tokens"] = chunk_tokens
    loss, logps, dX, dW, db = run(batch, backend, variant, dtype, **opts)

    h, w, b = batch.params()
    expected, picked = full_logits_nll(h, w, b, batch.labels, **head)
    expected.backward()
    seq = torch.repeat_interleave(torch.arange(batch.S), torch.tensor(batch.seqlens))
    sums = torch.zeros(batch.S, dtype=torch.float64).index_add(0, seq, picked.detach())
    assert_rel_close(loss, expected, tol, "loss")
    assert_rel_close(logps, sums, tol, "logps")
    assert not logps.requires_grad
    assert_rel_close(dX, h.grad, tol, "dX")
    assert_rel_close(dW, w.grad, tol, "dW")
    assert_rel_close(db, b.grad, tol, "db")
    assert dX[batch.labels == IGNORE].abs().max() == 0  # ignored rows get no gradient


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
