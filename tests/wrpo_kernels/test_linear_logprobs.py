"""linear_logprobs: odd shapes, padding, interface properties, memory and precision of the chunked torch
backend (docs/method.md §2, §6); its parity with the fp64 reference on every backend is in
tests/wrpo_kernels/parity/."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import IGNORE, assert_rel_close, largest_allocation, make_batch, rel_norm_err

from wrpo_kernels import LinearLogprobs, linear_logprobs

TOL64 = 1e-10


def run(batch, backend, *, dtype=None, reduction="sum", chunk_tokens=None, seed=1, **head):
    """Forward + backward with a random upstream gradient; returns (out, dX, dW, db)."""
    h, w, b = batch.params(dtype)
    kw = {"chunk_tokens": chunk_tokens} if backend == "torch" else {}
    out = linear_logprobs(
        h, w, batch.labels, batch.cu_seqlens, bias=b, reduction=reduction, backend=backend, **head, **kw
    )
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * g.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


def check_all_close(ours, ref, tol, label=""):
    for name, a, e in zip(("logps", "dX", "dW", "db"), ours, ref, strict=True):
        if e is None:
            assert a is None, f"{label} {name}: expected no gradient"
            continue
        assert_rel_close(a, e, tol, f"{label} {name}")


def test_reference_matches_cross_entropy():
    """The oracle itself: summed log-probs are minus the summed cross-entropy of each sequence."""
    batch = make_batch(B=2, K=3, H=7, V=31, seed=3, ignore_frac=0.3, with_bias=True)
    out = linear_logprobs(
        batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, bias=batch.bias, backend="reference"
    )
    logits = batch.hidden @ batch.weight.T + batch.bias
    ce = F.cross_entropy(logits, batch.labels, ignore_index=IGNORE, reduction="none")
    cu = batch.cu_seqlens.tolist()
    expected = torch.stack([-ce[cu[s] : cu[s + 1]].sum() for s in range(batch.S)])
    assert_rel_close(out, expected, 1e-12, "reference vs cross_entropy")


def test_one_token_sequences_match_reference():
    batch = make_batch(B=3, K=2, H=5, V=37, seed=11, lengths=[1] * 6, with_bias=True)
    for reduction in ("sum", "mean", "none"):
        ref = run(batch, "reference", reduction=reduction)
        ours = run(batch, "torch", reduction=reduction, chunk_tokens=4)
        check_all_close(ours, ref, TOL64, f"1-token {reduction}")


@pytest.mark.parametrize("chunk_tokens", [1, 4, None])
def test_fully_ignored_sequence_gives_zero_and_zero_grads(chunk_tokens):
    batch = make_batch(B=2, K=2, H=5, V=23, seed=5, min_len=2, max_len=5, with_bias=True)
    cu = batch.cu_seqlens.tolist()
    a, b = cu[2], cu[3]
    batch.labels[a:b] = IGNORE
    for backend in ("reference", "torch"):
        out, dX, dW, db = run(batch, backend, reduction="sum", chunk_tokens=chunk_tokens)
        assert out[2].item() == 0.0, backend
        assert torch.equal(dX[a:b], torch.zeros_like(dX[a:b])), backend
        assert bool((out[[0, 1, 3]] < 0).all()), backend
        assert dX[:a].abs().sum() > 0 and dX[b:].abs().sum() > 0, backend
    check_all_close(
        run(batch, "torch", chunk_tokens=chunk_tokens), run(batch, "reference"), TOL64, "ignored seq"
    )


def test_zero_length_sequence_gives_zero_for_sum():
    batch = make_batch(B=1, K=2, H=4, V=13, seed=2, lengths=[3, 4])
    cu = torch.tensor([0, 4, 4, 9])
    for backend in ("reference", "torch"):
        out = linear_logprobs(batch.hidden, batch.weight, batch.labels, cu, backend=backend)
        assert out.shape == (3,)
        assert out[1].item() == 0.0
        assert bool((out[[0, 2]] < 0).all())


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_padded_input_equals_packed(reduction, backend):
    batch = make_batch(B=2, K=3, H=6, V=19, seed=13, min_len=1, max_len=6, ignore_frac=0.2, with_bias=True)
    hp, lp = batch.padded(pad_value=5.0)
    hp.requires_grad_(True)
    h, w, b = batch.params()
    kw = {"reduction": reduction, "backend": backend}
    packed = linear_logprobs(h, w, batch.labels, batch.cu_seqlens, bias=b, **kw)
    padded = linear_logprobs(hp, w, lp, None, bias=b, **kw)
    cu = batch.cu_seqlens.tolist()
    lens = batch.seqlens
    if reduction == "none":
        assert padded.shape == lp.shape
        for s in range(batch.S):
            assert_rel_close(padded[s, : lens[s]], packed[cu[s] : cu[s + 1]], 1e-13, f"tokens of {s}")
            assert torch.equal(padded[s, lens[s] :], torch.zeros_like(padded[s, lens[s] :]))
    else:
        assert padded.shape == (batch.S,)
        assert_rel_close(padded, packed, 1e-13, "per-sequence")
    g = torch.randn(batch.S, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if reduction == "none":
        packed.sum().backward()
        padded.sum().backward()
    else:
        (packed * g).sum().backward()
        (padded * g).sum().backward()
    for s in range(batch.S):
        assert_rel_close(hp.grad[s, : lens[s]], h.grad[cu[s] : cu[s + 1]], 1e-12, f"dX of {s}")
        assert torch.equal(hp.grad[s, lens[s] :], torch.zeros_like(hp.grad[s, lens[s] :]))


def test_packed_without_cu_seqlens_is_one_sequence():
    batch = make_batch(B=1, K=2, H=4, V=11, seed=4)
    whole = linear_logprobs(batch.hidden, batch.weight, batch.labels, backend="torch", chunk_tokens=2)
    parts = linear_logprobs(batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, backend="torch")
    assert whole.shape == (1,)
    assert_rel_close(whole, parts.sum().view(1), 1e-13, "one sequence")


def test_non_contiguous_inputs_match_contiguous():
    batch = make_batch(B=2, K=2, H=6, V=17, seed=21, ignore_frac=0.2, with_bias=True)
    wide = torch.cat([batch.hidden, torch.randn(batch.N, 3, dtype=torch.float64)], 1)
    h_nc = wide[:, :6]  # row stride 9
    w_nc = batch.weight.T.contiguous().T  # column-major
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    for reduction in ("sum", "none"):
        expected = linear_logprobs(
            batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, bias=batch.bias, reduction=reduction
        )
        got = linear_logprobs(
            h_nc, w_nc, batch.labels, batch.cu_seqlens, bias=batch.bias, reduction=reduction, chunk_tokens=3
        )
        assert_rel_close(got, expected, 1e-13, reduction)


def test_int32_labels_and_custom_ignore_index():
    batch = make_batch(B=2, K=2, H=5, V=13, seed=8, min_len=2)
    labels = batch.labels.clone()
    labels[labels == -100] = -1
    labels[::3] = -1
    labels[0] = 2  # sequence 0 keeps a valid label
    for backend in ("reference", "torch"):
        expected = linear_logprobs(
            batch.hidden, batch.weight, labels, batch.cu_seqlens, ignore_index=-1, backend=backend
        )
        got = linear_logprobs(
            batch.hidden, batch.weight, labels.int(), batch.cu_seqlens, ignore_index=-1, backend=backend
        )
        assert torch.equal(got, expected), backend
    tok = linear_logprobs(
        batch.hidden, batch.weight, labels, batch.cu_seqlens, ignore_index=-1, reduction="none"
    )
    assert torch.equal(tok[labels == -1], torch.zeros_like(tok[labels == -1]))
    assert bool((tok[labels != -1] < 0).all())


def test_frozen_weight_gives_only_hidden_grad():
    batch = make_batch(B=2, K=2, H=5, V=13, seed=9, with_bias=True)
    h, w, b = batch.params()
    w.requires_grad_(False)
    b.requires_grad_(False)
    linear_logprobs(h, w, batch.labels, batch.cu_seqlens, bias=b, backend="torch").sum().backward()
    hr, wr, br = batch.params()
    linear_logprobs(hr, wr, batch.labels, batch.cu_seqlens, bias=br, backend="reference").sum().backward()
    assert w.grad is None and b.grad is None
    assert_rel_close(h.grad, hr.grad, TOL64, "dX")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_module_equals_function(reduction):
    batch = make_batch(B=1, K=3, H=5, V=11, seed=10, with_bias=True)
    mod = LinearLogprobs(reduction=reduction, softcap=3.0, chunk_tokens=2)
    got = mod(batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, bias=batch.bias)
    expected = linear_logprobs(
        batch.hidden,
        batch.weight,
        batch.labels,
        batch.cu_seqlens,
        bias=batch.bias,
        reduction=reduction,
        softcap=3.0,
        backend="reference",
    )
    assert_rel_close(got, expected, TOL64, "module")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_stay_finite(dtype):
    """Logits of order 1e4 overflow exp() unless the row max is subtracted first."""
    batch = make_batch(B=2, K=2, H=6, V=19, seed=16, with_bias=True)
    big = batch.cast(torch.float64)
    big.hidden = big.hidden * 1e4
    truth = run(big, "reference")
    ours = run(big.cast(dtype), "torch", chunk_tokens=3)
    for name, a, e in zip(("logps", "dX", "dW", "db"), ours, truth, strict=True):
        assert torch.isfinite(a).all(), name
        assert_rel_close(a, e, 1e-10 if dtype == torch.float64 else 1e-4, name)


def test_backward_can_run_twice_with_retain_graph():
    """Unlike the fused loss, the two-pass logprobs recompute in backward: a second backward accumulates."""
    batch = make_batch(B=1, K=3, H=5, V=11, seed=15, with_bias=True)
    h, w, b = batch.params()
    out = linear_logprobs(h, w, batch.labels, batch.cu_seqlens, bias=b, backend="torch", chunk_tokens=2)
    out.sum().backward(retain_graph=True)
    once = (h.grad.clone(), w.grad.clone(), b.grad.clone())
    out.sum().backward()
    for first, twice in zip(once, (h.grad, w.grad, b.grad), strict=True):
        assert_rel_close(twice, 2 * first, 1e-14, "accumulated")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_never_materialises_full_logits(reduction):
    """Forward + backward allocate at most a chunk of logits, never [N, V] (docs/method.md §2, §4)."""
    batch = make_batch(B=4, K=3, H=8, V=1000, seed=0, min_len=20, max_len=40, with_bias=True)
    full_logits = batch.N * batch.V * 8

    def step(backend, chunk_tokens=None):
        h, w, b = batch.params()
        kw = {"chunk_tokens": chunk_tokens} if chunk_tokens else {}
        out = linear_logprobs(
            h, w, batch.labels, batch.cu_seqlens, bias=b, reduction=reduction, backend=backend, **kw
        )
        out.sum().backward()

    assert largest_allocation(lambda: step("reference")) >= full_logits  # the probe sees [N, V]
    assert largest_allocation(lambda: step("torch", 16)) <= full_logits / 8


# ---- low precision: no worse than the naive computation in the same dtype ---------------------------------


@pytest.mark.parametrize(
    ("dtype", "slack"),
    [(torch.float32, 1e-6), (torch.float16, 1e-4), (torch.bfloat16, 1e-3)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("chunk_tokens", [5, None])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_low_precision_error_no_worse_than_naive(dtype, slack, reduction, chunk_tokens, softcap):
    batch = make_batch(B=3, K=3, H=24, V=101, seed=17, min_len=4, max_len=12, ignore_frac=0.2, with_bias=True)
    # the fp64 truth on exactly the low-precision inputs
    lowp = batch.cast(dtype)
    kw = {"reduction": reduction, "softcap": softcap}
    truth = run(lowp, "reference", dtype=torch.float64, **kw)
    naive = run(lowp, "reference", **kw)
    ours = run(lowp, "torch", chunk_tokens=chunk_tokens, **kw)
    assert ours[0].dtype == torch.float32, "log-probs are fp32 for low-precision inputs"
    for i, name in enumerate(("logps", "dX", "dW", "db")):
        assert ours[i].dtype == naive[i].dtype, name
        err_ours, err_naive = rel_norm_err(ours[i], truth[i]), rel_norm_err(naive[i], truth[i])
        assert err_ours <= 1.5 * err_naive + slack, f"{name}: ours {err_ours:.2e} vs naive {err_naive:.2e}"


# ---- gradcheck --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck_torch_backend(reduction, softcap):
    batch = make_batch(B=1, K=2, H=3, V=5, seed=12, lengths=[2, 3], ignore_frac=0.2, with_bias=True)
    h, w, b = batch.params()

    def fn(h, w, b):
        return linear_logprobs(
            h,
            w,
            batch.labels,
            batch.cu_seqlens,
            bias=b,
            reduction=reduction,
            softcap=softcap,
            temperature=0.9,
            backend="torch",
            chunk_tokens=2,
        )

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
