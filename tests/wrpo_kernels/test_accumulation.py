"""Micro-batches with the whole batch's denominators sum to the whole batch: loss and gradients.

``fused_linear_wrpo_loss(..., num_groups=G, num_nll_tokens=T)`` on a slice of the groups returns that
slice's share of the mean over all G groups (and of the NLL mean over all T first-chosen tokens), so
gradient accumulation over micro-batches, of equal size or not, gives exactly the batch's gradient.
Also: ``logits/chosen`` / ``logits/rejected`` against the mean of the full logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, assert_rel_close, make_batch

from wrpo_kernels import fused_linear_wrpo_loss

OPTIONS = {
    "dpo": {"loss_type": "dpo", "beta": 0.3, "alpha": 0.2},
    "dpo_nll": {"loss_type": "dpo", "beta": 0.3, "alpha": 0.2, "nll_weight": 0.4},
    "simpo_nll": {"loss_type": "simpo", "beta": 2.0, "gamma": 0.3, "nll_weight": 0.7},
    "ipo": {"loss_type": "ipo", "beta": 0.5},
}


def _slice(batch, g0, g1):
    """Rows, labels, cu_seqlens and ref_logps of groups [g0, g1) (fresh leaves)."""
    cu = batch.cu_seqlens.tolist()
    a, b = cu[g0 * batch.K], cu[g1 * batch.K]
    cu_part = torch.tensor(cu[g0 * batch.K : g1 * batch.K + 1]) - a
    return batch.hidden[a:b], batch.labels[a:b], cu_part, batch.ref_logps[g0:g1]


def _run(batch, splits, backend, *, counts, **opts):
    """Sum of the micro-batch losses and the accumulated gradients (hidden, weight, bias)."""
    w = batch.weight.clone().requires_grad_(True)
    bias = batch.bias.clone().requires_grad_(True)
    dX, total = [], 0.0
    for g0, g1 in zip(splits, splits[1:], strict=False):
        h, labels, cu, ref = _slice(batch, g0, g1)
        h = h.clone().requires_grad_(True)
        kw = {"num_groups": counts[0], "num_nll_tokens": counts[1]} if counts else {}
        out = fused_linear_wrpo_loss(
            h,
            w,
            labels,
            cu,
            bias=bias,
            ref_logps=ref,
            responses_per_prompt=batch.K,
            backend=backend,
            **kw,
            **opts,
        )
        out.loss.backward()
        total = total + out.loss.detach()
        dX.append(h.grad)
    return total, torch.cat(dX), w.grad, bias.grad


def _first_chosen_tokens(batch) -> int:
    cu = batch.cu_seqlens.tolist()
    return sum(int((batch.labels[cu[s] : cu[s + 1]] != IGNORE).sum()) for s in range(0, batch.S, batch.K))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("splits", [[0, 2, 4], [0, 1, 4], [0, 1, 2, 3, 4]], ids=["2+2", "1+3", "1x4"])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_micro_batches_with_batch_counts_equal_the_whole_batch(case, splits, backend):
    batch = make_batch(B=4, K=3, H=7, V=23, seed=3, max_len=7, ignore_frac=0.2, with_bias=True)
    counts = (batch.B, _first_chosen_tokens(batch))
    whole = _run(batch, [0, 4], backend, counts=None, **OPTIONS[case])
    parts = _run(batch, splits, backend, counts=counts, **OPTIONS[case])
    for name, a, b in zip(("loss", "dX", "dW", "db"), parts, whole, strict=True):
        assert_rel_close(a, b, 1e-12, f"{case} {splits} {name}")


def test_micro_batch_means_alone_are_not_the_batch_mean():
    """Without the counts, uneven micro-batches weigh groups unequally: the test above can fail."""
    batch = make_batch(B=4, K=3, H=7, V=23, seed=3, max_len=7, with_bias=True)
    whole = _run(batch, [0, 4], "torch", counts=None, **OPTIONS["dpo_nll"])
    parts = _run(batch, [0, 1, 4], "torch", counts=None, **OPTIONS["dpo_nll"])
    assert abs(parts[0] - 2 * whole[0]) < 0.5 * whole[0]  # two means summed: about twice the mean
    assert (parts[2] - whole[2]).abs().max() > 1e-3 * whole[2].abs().max()


def test_tensor_counts_equal_number_counts():
    batch = make_batch(B=4, K=3, H=7, V=23, seed=4, with_bias=True)
    counts = (batch.B, _first_chosen_tokens(batch))
    as_numbers = _run(batch, [0, 3, 4], "torch", counts=counts, **OPTIONS["dpo_nll"])
    as_tensors = _run(
        batch, [0, 3, 4], "torch", counts=tuple(torch.tensor(c) for c in counts), **OPTIONS["dpo_nll"]
    )
    for a, b in zip(as_numbers, as_tensors, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), True, "4", torch.ones(2)])
def test_bad_counts_are_refused(bad):
    batch = make_batch(B=2, K=3)
    with pytest.raises(ValueError, match="num_groups"):
        fused_linear_wrpo_loss(
            batch.hidden,
            batch.weight,
            batch.labels,
            batch.cu_seqlens,
            ref_logps=batch.ref_logps,
            num_groups=bad,
            backend="torch",
        )


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(("K", "num_chosen"), [(3, 2), (2, 1), (4, 3)])
def test_mean_logit_metrics_match_the_full_logits(backend, K, num_chosen):
    batch = make_batch(B=3, K=K, H=6, V=31, seed=K, ignore_frac=0.3, with_bias=True)
    out = fused_linear_wrpo_loss(
        batch.hidden,
        batch.weight,
        batch.labels,
        batch.cu_seqlens,
        bias=batch.bias,
        ref_logps=batch.ref_logps,
        responses_per_prompt=K,
        num_chosen=num_chosen,
        backend=backend,
        softcap=2.0,
        temperature=0.7,  # raw logits: neither changes the metric
    )
    logits = batch.hidden @ batch.weight.T + batch.bias  # [N, V], fp64
    seq = torch.repeat_interleave(torch.arange(batch.S), batch.cu_seqlens.diff())
    valid = batch.labels != IGNORE
    chosen = valid & (seq % K < num_chosen)
    rejected = valid & (seq % K >= num_chosen)
    assert_rel_close(out.metrics["logits/chosen"], logits[chosen].mean(), 1e-12, "chosen")
    assert_rel_close(out.metrics["logits/rejected"], logits[rejected].mean(), 1e-12, "rejected")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_does_not_change_the_fused_loss(backend):
    """Under bf16 autocast the head still computes in its inputs' dtype (here fp32), exactly; the
    backward runs outside autocast, as autocast's documentation asks."""
    batch = make_batch(B=2, K=3, H=6, V=29, seed=5, dtype=torch.float32, with_bias=True)

    def loss_and_grads(cast):
        h, w, b = batch.params()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = fused_linear_wrpo_loss(
                h,
                w,
                batch.labels,
                batch.cu_seqlens,
                bias=b,
                ref_logps=batch.ref_logps,
                backend=backend,
                **OPTIONS["dpo_nll"],
            )
        out.loss.backward()
        return out.loss.detach(), h.grad, w.grad, b.grad

    for a, b in zip(loss_and_grads(True), loss_and_grads(False), strict=True):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 activation beside fp32 weights
        out = fused_linear_wrpo_loss(
            batch.hidden.bfloat16(),
            batch.weight,
            batch.labels,
            batch.cu_seqlens,
            ref_logps=batch.ref_logps,
            backend=backend,
        )
    assert out.loss.dtype == torch.float32
