"""fused_linear_wrpo_loss: precision, interface properties and hand-computed groups (docs/method.md §3, §6).

Its parity with the fp64 reference on every backend is in tests/wrpo_kernels/parity/."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    IGNORE,
    METRIC_NAMES,
    assert_rel_close,
    check_all_close,
    fused,
    largest_allocation,
    make_batch,
    max_rel_err,
    rel_norm_err,
    resolve_chunk,
    same_size_groups,
)

from wrpo_kernels import fused_linear_wrpo_loss, linear_logprobs, wrpo_loss
from wrpo_kernels.chunked.schedule import plan_group_chunks

TOL64 = 1e-10
SOURCE_METRICS = {"rewards/source_chosen", "rewards/source_accuracies", "logps/source_chosen"}


def test_chunk_budgets_exercise_the_intended_paths():
    """The budgets of the parity suite give several groups per chunk, one group, and split groups."""
    B, K = 3, 3
    batch = make_batch(B=B, K=K, lengths=same_size_groups(B, K, seed=K))
    cu = batch.cu_seqlens.tolist()
    several = plan_group_chunks(cu, K, resolve_chunk("groups", batch))
    assert any(c.g1 - c.g0 > 1 for c in several) and all(c.single_pass for c in several)
    one = plan_group_chunks(cu, K, resolve_chunk("group", batch))
    assert all(c.g1 - c.g0 == 1 and c.single_pass for c in one)
    split = plan_group_chunks(cu, K, 5)
    assert all(not c.single_pass for c in split)


@pytest.mark.parametrize(
    ("dtype", "slack"),
    [(torch.float32, 1e-6), (torch.float16, 1e-4), (torch.bfloat16, 1e-3)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
@pytest.mark.parametrize("chunk", [None, "group", 7])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_low_precision_error_no_worse_than_naive(dtype, slack, loss_type, chunk, softcap):
    B, K = 3, 3
    batch = make_batch(
        B=B,
        K=K,
        H=24,
        V=101,
        seed=5,
        lengths=same_size_groups(B, K, seed=2, min_len=4, max_len=12),
        ignore_frac=0.1,
        with_bias=True,
    ).cast(dtype)
    opts = {"loss_type": loss_type, "beta": 0.1, "alpha": 0.3, "softcap": softcap}
    truth = fused(batch, "reference", dtype=torch.float64, **opts)
    naive = fused(batch, "reference", **opts)
    ours = fused(batch, "torch", chunk_tokens=resolve_chunk(chunk, batch), **opts)
    assert ours["logps"].dtype == torch.float32
    assert ours["loss"].dtype == naive["loss"].dtype
    for name in ("loss", "logps", "dX", "dW", "db"):
        assert ours[name].dtype == naive[name].dtype, name
        err_ours, err_naive = rel_norm_err(ours[name], truth[name]), rel_norm_err(naive[name], truth[name])
        assert err_ours <= 1.5 * err_naive + slack, f"{name}: ours {err_ours:.2e} vs naive {err_naive:.2e}"


def test_gradient_matches_finite_differences_torch_backend():
    """gradcheck of the torch backend by central differences in fp64.

    ``torch.autograd.gradcheck`` itself cannot be used: it runs backward twice on one graph to test
    reentrancy, and the fused backward hands out its precomputed gradients once (docs/method.md §4).
    """
    batch = make_batch(B=2, K=3, H=3, V=5, seed=4, lengths=[2, 1, 2, 1, 3, 1], with_bias=True)
    opts = {"loss_type": "dpo", "beta": 0.7, "alpha": 0.3, "nll_weight": 0.2, "softcap": 2.0}
    for chunk in (None, 2):
        h, w, b = batch.params()

        def f(h, w, b, chunk=chunk):
            return fused_linear_wrpo_loss(
                h,
                w,
                batch.labels,
                batch.cu_seqlens,
                bias=b,
                ref_logps=batch.ref_logps,
                backend="torch",
                chunk_tokens=chunk,
                **opts,
            ).loss

        f(h, w, b).backward()
        eps = 1e-6
        for name, x in (("hidden", h), ("weight", w), ("bias", b)):
            numeric = torch.zeros_like(x)
            with torch.no_grad():
                for i in range(x.numel()):
                    flat = x.view(-1)
                    orig = flat[i].item()
                    flat[i] = orig + eps
                    up = f(h, w, b).item()
                    flat[i] = orig - eps
                    down = f(h, w, b).item()
                    flat[i] = orig
                    numeric.view(-1)[i] = (up - down) / (2 * eps)
            assert torch.allclose(x.grad, numeric, rtol=1e-5, atol=1e-8), f"d{name} chunk={chunk}"


# ---- interface properties --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_no_grad_gives_same_loss_and_logps(backend):
    batch = make_batch(B=2, K=3, H=5, V=17, seed=6, with_bias=True)
    opts = {"beta": 0.3, "chunk_tokens": 4} if backend == "torch" else {"beta": 0.3}
    with_grad = fused(batch, backend, grad=False, **opts)
    h, w, b = batch.params()
    with torch.no_grad():
        out = fused_linear_wrpo_loss(
            h, w, batch.labels, batch.cu_seqlens, bias=b, ref_logps=batch.ref_logps, backend=backend, **opts
        )
    assert not out.loss.requires_grad
    assert torch.equal(out.loss, with_grad["loss"])
    assert torch.equal(out.logps, with_grad["logps"])


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(("K", "num_chosen"), [(3, 2), (4, 3), (2, 1)])
def test_output_shapes_and_metric_names(backend, K, num_chosen):
    batch = make_batch(B=2, K=K, H=5, V=17, seed=7)
    res = fused(batch, backend, num_chosen=num_chosen, beta=0.3)
    out = res["out"]
    assert out.loss.dim() == 0
    assert out.logps.shape == (2, K)
    assert not out.logps.requires_grad and out.logps.grad_fn is None
    expected = METRIC_NAMES if num_chosen > 1 else METRIC_NAMES - SOURCE_METRICS
    assert set(out.metrics) == expected
    for k, v in out.metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0, k
        assert not v.requires_grad and v.grad_fn is None, k


def test_nll_metric_is_reported_when_weighted():
    batch = make_batch(B=2, K=3, H=5, V=17, seed=8)
    res = fused(batch, "torch", nll_weight=0.5, beta=0.3)
    counts = batch.counts.view(2, 3)
    expected = -res["logps"][:, 0].sum() / counts[:, 0].sum()
    assert_rel_close(res["metrics"]["nll_loss"], expected, 1e-12, "nll_loss")


def test_backward_twice_raises_on_torch_backend():
    batch = make_batch(B=1, K=3, H=4, V=11, seed=9)
    h, w, _ = batch.params()
    out = fused_linear_wrpo_loss(
        h, w, batch.labels, batch.cu_seqlens, ref_logps=batch.ref_logps, backend="torch"
    )
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("chunk", [None, 3])
def test_upstream_gradient_scales_gradients(chunk):
    batch = make_batch(B=2, K=3, H=5, V=17, seed=10, with_bias=True)
    one = fused(batch, "torch", chunk_tokens=chunk, beta=0.3)
    three = fused(batch, "torch", chunk_tokens=chunk, beta=0.3, upstream=-3.0)
    for name in ("dX", "dW", "db"):
        assert_rel_close(three[name], -3.0 * one[name], 1e-13, name)


@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
def test_only_requested_gradients_are_computed(trainable):
    batch = make_batch(B=2, K=3, H=5, V=17, seed=11, with_bias=True)
    ref = fused(batch, "reference", beta=0.3)
    h, w, b = batch.params()
    for name, t in (("hidden", h), ("weight", w), ("bias", b)):
        t.requires_grad_(name == trainable)
    out = fused_linear_wrpo_loss(
        h,
        w,
        batch.labels,
        batch.cu_seqlens,
        bias=b,
        ref_logps=batch.ref_logps,
        beta=0.3,
        backend="torch",
        chunk_tokens=3,
    )
    out.loss.backward()
    grads = {"hidden": h.grad, "weight": w.grad, "bias": b.grad}
    expected = {"hidden": ref["dX"], "weight": ref["dW"], "bias": ref["db"]}
    for name, g in grads.items():
        if name == trainable:
            assert_rel_close(g, expected[name], TOL64, name)
        else:
            assert g is None, name


@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
def test_fused_equals_wrpo_loss_of_linear_logprobs(loss_type):
    """The fused call is the composition of its two public halves, values and gradients."""
    batch = make_batch(B=3, K=4, H=5, V=23, seed=12, ignore_frac=0.2, with_bias=True)
    opts = {"num_chosen": 2, "alpha": 0.4, "loss_type": loss_type, "beta": 0.25, "gamma": 0.1}
    res = fused(batch, "torch", chunk_tokens=6, **opts)
    h, w, b = batch.params()
    logps = linear_logprobs(h, w, batch.labels, batch.cu_seqlens, bias=b, backend="torch").view(3, 4)
    loss, metrics = wrpo_loss(logps, batch.ref_logps, batch.counts.view(3, 4), **opts)
    loss.backward()
    assert_rel_close(res["loss"], loss, TOL64, "loss")
    assert_rel_close(res["logps"], logps, TOL64, "logps")
    for name, g in (("dX", h.grad), ("dW", w.grad), ("db", b.grad)):
        assert_rel_close(res[name], g, TOL64, name)
    for k, v in metrics.items():
        assert_rel_close(res["metrics"][k], v, TOL64, k)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_padded_input_equals_packed(backend):
    batch = make_batch(B=2, K=3, H=5, V=17, seed=13, ignore_frac=0.2, with_bias=True)
    packed = fused(batch, backend, beta=0.3)
    hp, lp = batch.padded()
    hp.requires_grad_(True)
    _, w, b = batch.params()
    out = fused_linear_wrpo_loss(
        hp, w, lp, None, bias=b, ref_logps=batch.ref_logps, beta=0.3, backend=backend
    )
    out.loss.backward()
    assert_rel_close(out.loss, packed["loss"], 1e-12, "loss")
    assert_rel_close(out.logps, packed["logps"], 1e-12, "logps")
    assert_rel_close(w.grad, packed["dW"], 1e-12, "dW")
    cu, lens = batch.cu_seqlens.tolist(), batch.seqlens
    for s in range(batch.S):
        assert_rel_close(hp.grad[s, : lens[s]], packed["dX"][cu[s] : cu[s + 1]], 1e-12, f"dX {s}")
        assert torch.equal(hp.grad[s, lens[s] :], torch.zeros_like(hp.grad[s, lens[s] :]))


def test_ignored_tokens_get_zero_gradient():
    batch = make_batch(B=2, K=3, H=5, V=17, seed=14, min_len=3, ignore_frac=0.3)
    ignored = batch.labels == IGNORE
    assert ignored.any()
    for chunk in (None, 2):
        res = fused(batch, "torch", chunk_tokens=chunk, beta=0.3)
        assert torch.equal(res["dX"][ignored], torch.zeros_like(res["dX"][ignored]))
        assert bool((res["dX"][~ignored].abs().sum(1) > 0).all())


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ignored_rows_never_reach_the_head(monkeypatch, reduction):
    """Rows labelled ignore_index (prompt, padding) never reach the GEMMs: only labelled rows get logits."""
    from wrpo_kernels import torch_backend

    batch = make_batch(B=3, K=3, H=6, V=23, seed=21, min_len=4, max_len=9, ignore_frac=0.6)
    n_valid = int((batch.labels != IGNORE).sum())
    assert n_valid < batch.N // 2
    seen = []

    class CountingOps:  # the backend's row ops (torch or native), counting the rows each GEMM gets
        def __init__(self, ops):
            self.ops = ops

        def __getattr__(self, name):
            return getattr(self.ops, name)

        def logits(self, ws, hidden, *args, **kwargs):
            seen.append(hidden.shape[0])
            return self.ops.logits(ws, hidden, *args, **kwargs)

    for name in ("run_fused", "run_logprobs"):
        run = getattr(torch_backend, name)
        monkeypatch.setattr(
            torch_backend, name, lambda ops, x, _run=run, **kw: _run(CountingOps(ops), x, **kw)
        )
    res = fused(batch, "torch", beta=0.3)
    ref = fused(batch, "reference", beta=0.3)
    assert sum(seen) == n_valid  # one pass: each labelled row once, nothing else
    check_all_close(res, ref, 1e-10)
    seen.clear()
    h, w, _ = batch.params()
    out = linear_logprobs(h, w, batch.labels, batch.cu_seqlens, reduction=reduction, backend="torch")
    out.sum().backward()
    assert sum(seen) == 2 * n_valid  # two-pass: forward and the backward's recompute
    h_ref, w_ref, _ = batch.params()
    expect = linear_logprobs(
        h_ref, w_ref, batch.labels, batch.cu_seqlens, reduction=reduction, backend="reference"
    )
    expect.sum().backward()
    assert out.shape == expect.shape
    assert_rel_close(out, expect, 1e-12, "logps")
    assert_rel_close(h.grad, h_ref.grad, 1e-12, "dX")
    assert torch.equal(h.grad[batch.labels == IGNORE], torch.zeros_like(h.grad[batch.labels == IGNORE]))


@pytest.mark.parametrize("chunk_tokens", [16, 80])
def test_never_materialises_full_logits(chunk_tokens):
    """One pass allocates one chunk of logits (whole groups or tiles of a group), never [N, V]."""
    batch = make_batch(B=4, K=3, H=8, V=1000, seed=0, min_len=10, max_len=20, with_bias=True)
    full_logits = batch.N * batch.V * 8
    assert 2 * chunk_tokens < batch.N

    def step(backend):
        h, w, b = batch.params()
        kw = {"chunk_tokens": chunk_tokens} if backend == "torch" else {}
        out = fused_linear_wrpo_loss(
            h, w, batch.labels, batch.cu_seqlens, bias=b, ref_logps=batch.ref_logps, backend=backend, **kw
        )
        out.loss.backward()

    assert largest_allocation(lambda: step("reference")) >= full_logits  # the probe sees [N, V]
    assert largest_allocation(lambda: step("torch")) <= full_logits * (chunk_tokens / batch.N) * 1.5 + 1024


# ---- a hand-computed example -------------------------------------------------------------------------------

# One group, K = 3: source, target, rejected. Policy/reference log-probs and token counts:
S_POL = [-10.0, -12.0, -20.0]
S_REF = [-11.0, -11.0, -15.0]
N_TOK = [5, 4, 8]
ALPHA, BETA = 0.25, 0.5  # chosen weights [0.25, 0.75]


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# rewards r, margin m (by hand from the numbers above), loss, dL/dm
HAND = {
    # r = beta (s - s_ref) = [0.5, -0.5, -2.5]; m = 0.25*0.5 + 0.75*(-0.5) + 2.5 = 2.25
    "dpo": {"r": [0.5, -0.5, -2.5], "m": 2.25, "c": [0.5, 0.5, 0.5], "gamma": 0.0},
    # r = beta s / n = [-1, -1.5, -1.25]; m = -0.25 - 1.125 + 1.25 - gamma(0.3) = -0.425
    "simpo": {"r": [-1.0, -1.5, -1.25], "m": -0.425, "c": [0.1, 0.125, 0.0625], "gamma": 0.3},
    # r = (s - s_ref) / n = [0.2, -0.25, -0.625]; m = 0.05 - 0.1875 + 0.625 = 0.4875
    "ipo": {"r": [0.2, -0.25, -0.625], "m": 0.4875, "c": [0.2, 0.25, 0.125], "gamma": 0.0},
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
def test_hand_computed_group(loss_type, backend):
    case = HAND[loss_type]
    m = case["m"]
    if loss_type == "ipo":
        expected_loss = (m - 1 / (2 * BETA)) ** 2  # (0.4875 - 1)^2 = 0.26265625
        dldm = 2 * (m - 1 / (2 * BETA))
    else:
        expected_loss = softplus(-m)  # -log sigmoid(m)
        dldm = -sigmoid(-m)
    policy = torch.tensor([S_POL], dtype=torch.float64, requires_grad=True)
    loss, metrics = wrpo_loss(
        policy,
        torch.tensor([S_REF], dtype=torch.float64),
        torch.tensor([N_TOK]),
        alpha=ALPHA,
        loss_type=loss_type,
        beta=BETA,
        gamma=case["gamma"],
        backend=backend,
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    if loss_type == "ipo":
        assert loss.item() == pytest.approx(0.26265625, rel=1e-12)
    a = [0.25, 0.75, -1.0]  # margin coefficients: chosen weights, then -1/(#rejected)
    expected_grad = [dldm * a[k] * case["c"][k] for k in range(3)]
    assert policy.grad[0].tolist() == pytest.approx(expected_grad, rel=1e-12)

    r = case["r"]
    chosen = 0.25 * r[0] + 0.75 * r[1]
    expected_metrics = {
        "rewards/chosen": chosen,
        "rewards/source_chosen": r[0],
        "rewards/target_chosen": r[1],
        "rewards/rejected": r[2],
        "rewards/accuracies": float(chosen > r[2]),
        "rewards/source_accuracies": float(r[0] > r[2]),
        "rewards/pivot_accuracies": float(r[1] > r[2]),
        "rewards/margins": chosen - r[2],
        "logps/chosen": -11.0,
        "logps/source_chosen": -10.0,
        "logps/target_chosen": -12.0,
        "logps/rejected": -20.0,
        "cur_alpha": ALPHA,
    }
    assert set(metrics) == set(expected_metrics)
    for k, v in expected_metrics.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_hand_computed_label_smoothing():
    eps, m = 0.1, HAND["dpo"]["m"]
    loss, _ = wrpo_loss(
        torch.tensor([S_POL], dtype=torch.float64),
        torch.tensor([S_REF], dtype=torch.float64),
        None,
        alpha=ALPHA,
        beta=BETA,
        label_smoothing=eps,
    )
    assert loss.item() == pytest.approx((1 - eps) * softplus(-m) + eps * softplus(m), rel=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_hand_computed_k4_two_sources_two_groups(backend):
    """K = 4, num_chosen = 3 (two sources share alpha), two groups; dpo, beta = 1, zero reference.

    Chosen weights [0.25, 0.25, 0.5]. Group 0: sources [-1, -1], target -4, rejected -3;
    group 1: sources [-1, -2], target -6, rejected -2.5. Weighted chosen rewards [-2.5, -3.75],
    margins [0.5, -1.25]. The three accuracies differ: weighted 1/2, source 2/2, pivot 0/2.
    """
    policy = torch.tensor([[-1.0, -1.0, -4.0, -3.0], [-1.0, -2.0, -6.0, -2.5]], dtype=torch.float64)
    policy.requires_grad_(True)
    zero = torch.zeros(2, 4, dtype=torch.float64)
    loss, metrics = wrpo_loss(policy, zero, None, num_chosen=3, alpha=0.5, beta=1.0, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(1.25)) / 2, rel=1e-12)
    a = [0.25, 0.25, 0.5, -1.0]
    for b, m in enumerate([0.5, -1.25]):  # dL/ds = -sigmoid(-m) * a / B
        expected = [-sigmoid(-m) * ak / 2 for ak in a]
        assert policy.grad[b].tolist() == pytest.approx(expected, rel=1e-12)
    expected_metrics = {
        "rewards/chosen": -3.125,
        "rewards/source_chosen": -1.25,
        "rewards/target_chosen": -5.0,
        "rewards/rejected": -2.75,
        "rewards/accuracies": 0.5,
        "rewards/source_accuracies": 1.0,
        "rewards/pivot_accuracies": 0.0,
        "rewards/margins": -0.375,
        "logps/chosen": -2.5,
        "logps/source_chosen": -1.25,
        "logps/target_chosen": -5.0,
        "logps/rejected": -2.75,
        "cur_alpha": 0.5,
    }
    assert set(metrics) == set(expected_metrics)
    for k, v in expected_metrics.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-12, abs=1e-12), k


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_hand_computed_two_rejected_uses_their_mean(backend):
    """K = 4, num_chosen = 2: the margin subtracts the mean reward of the two rejected responses."""
    policy = torch.tensor([[-1.0, -2.0, -3.0, -7.0]], dtype=torch.float64)
    zero = torch.zeros(1, 4, dtype=torch.float64)
    loss, metrics = wrpo_loss(policy, zero, None, num_chosen=2, alpha=0.2, beta=1.0, backend=backend)
    # chosen = 0.2*-1 + 0.8*-2 = -1.8; mean rejected = -5; m = 3.2
    assert loss.item() == pytest.approx(softplus(-3.2), rel=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(-5.0)
    assert metrics["rewards/accuracies"].item() == pytest.approx(1.0)
    # pivot: target -2 beats -3 and -7; source -1 beats both
    assert metrics["rewards/pivot_accuracies"].item() == pytest.approx(1.0)
    assert metrics["logps/rejected"].item() == pytest.approx(-5.0)
    assert max_rel_err(metrics["rewards/margins"], torch.tensor(3.2, dtype=torch.float64)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_grads_first_chunk_overwrites_garbage(dtype):
    """dW/db start uninitialised: the first chunk writes them (NaN garbage must not leak), later ones add."""
    from wrpo_kernels.chunked import HeadGrads

    g = torch.Generator().manual_seed(3)
    N, H, V = 7, 5, 11
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    dlogits = torch.randn(N, V, generator=g, dtype=torch.float64)
    grads = HeadGrads(hidden.to(dtype), weight.to(dtype), (True, True, True))
    grads.dW.fill_(float("nan"))
    grads.db.fill_(float("nan"))
    lowp = torch.empty(N, V, dtype=dtype)
    for a, b in ((0, 3), (3, 7)):
        grads.add_rows_(
            dlogits[a:b].to(grads.dW.dtype), a, b, hidden.to(dtype), weight.to(dtype), lowp[: b - a]
        )
    dX, dW, db = grads.to_input_dtypes(dtype, dtype)
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    assert_rel_close(dW.double(), dlogits.t() @ hidden, tol, "dW")
    assert_rel_close(db.double(), dlogits.sum(0), tol, "db")
    assert_rel_close(dX.double(), dlogits @ weight, tol, "dX")


def test_head_grads_without_rows_are_zero():
    from wrpo_kernels.chunked import HeadGrads

    grads = HeadGrads(torch.randn(0, 4), torch.randn(6, 4), (True, True, True))
    grads.dW.fill_(float("nan"))
    grads.scale_(torch.tensor(2.0))
    _, dW, db = grads.to_input_dtypes(torch.float32, torch.float32)
    assert torch.equal(dW, torch.zeros(6, 4)) and torch.equal(db, torch.zeros(6))
