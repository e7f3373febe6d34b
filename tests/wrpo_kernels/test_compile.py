"""torch.compile: fake kernels of the native operators, and the public functions as a compile boundary.

The public functions read values on the host (cu_seqlens, label checks) and plan chunks in Python, so
``wrpo_kernels.api.compile_boundary`` runs them eagerly when dynamo meets them: a compiled function
that computes hidden states and then calls the loss compiles into the graph before the call and the
graph after it (benchmarks/compile_boundary.py measures why). The native operators of ``csrc/`` have
fake kernels all the same (``native.register_fake_kernels``), so tracing through them works too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_rel_close, make_batch

import wrpo_kernels as wk
from wrpo_kernels import native

ROWS = {"csrc": contextlib.nullcontext, "torch-rows": native.disabled}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def ops():
    if os.environ.get(native.ENV_DISABLE, "") not in ("", "0"):
        pytest.skip(f"{native.ENV_DISABLE} is set")
    if not native.load():
        pytest.skip("the native kernels did not build here (see test_csrc.py)")
    return torch.ops.wrpo_kernels


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphCounter:
    """A dynamo backend that counts the graphs it is handed and runs them as they are."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


# ---- fake kernels ------------------------------------------------------------------------------


def lse_target_args(dtype, n=5, V=37, softcap=None, temperature=1.0):
    g = torch.Generator().manual_seed(n * V)
    logits_t = (torch.randn(V, n, generator=g, dtype=torch.float64) * 3).to(dtype)
    return logits_t, torch.randint(0, V, (n,), generator=g), softcap, temperature


@pytest.mark.parametrize(("softcap", "temperature"), [(None, 1.0), (3.0, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_lse_target_and_logit_grad(ops, dtype, softcap, temperature):
    args = lse_target_args(dtype, softcap=softcap, temperature=temperature)
    torch.library.opcheck(ops.lse_target.default, args)
    logits_t, labels = args[0], args[1]
    lse, _ = ops.lse_target(*args)
    scale = torch.linspace(-1, 1, labels.numel(), dtype=lse.dtype)
    torch.library.opcheck(
        ops.logit_grad_.default, (logits_t.clone(), labels, scale, lse, softcap, temperature)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_workspace(ops, dtype):
    # uninitialised memory: the checks that compare values with a second run do not apply
    torch.library.opcheck(
        ops.workspace.default,
        (7, 48, dtype),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize(
    ("dtype", "math"),
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_fake_kernels_give_the_schema_shapes_and_dtypes(ops, dtype, math):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = lse_target_args(dtype, n=6, V=11)
    with FakeTensorMode() as mode:
        logits_t, labels = mode.from_tensor(real[0]), mode.from_tensor(real[1])
        lse, target = ops.lse_target(logits_t, labels, None, 1.0)
        assert lse.shape == target.shape == (6,) and lse.dtype == target.dtype == math
        assert ops.logit_grad_(logits_t, labels, lse, lse, None, 1.0) is None
        ws = ops.workspace(11, 64, dtype)
        assert ws.shape == (11, 64) and ws.dtype == dtype and ws.device.type == "cpu"


def test_failed_fake_registration_keeps_the_native_kernels(ops, monkeypatch):
    """Eager calls do not need fake kernels: a failure to register them warns and changes nothing else."""

    def refuse(*args, **kwargs):
        raise RuntimeError("no fake kernels here")

    monkeypatch.setattr(native, "_loaded", None)  # as in a new process (the build is reused)
    monkeypatch.setattr(torch.library, "register_fake", refuse)
    with pytest.warns(RuntimeWarning, match="no fake kernels for the native operators"):
        assert native.load()
    assert native.row_kernels_enabled(torch.device("cpu"))


def test_native_ops_trace_into_one_graph(ops):
    """The three operators as the chunked backend chains them trace with fullgraph=True."""

    def rows(hidden, weight, labels, scale):
        ws = ops.workspace(weight.shape[0], hidden.shape[0], hidden.dtype)
        ws.copy_(weight @ hidden.t())  # logits_t [V, n]
        lse, target = ops.lse_target(ws, labels, 5.0, 0.8)
        ops.logit_grad_(ws, labels, scale, lse, 5.0, 0.8)  # ws <- dL/dlogits_t
        return target - lse, ws.t() @ weight

    b = make_batch(dtype=torch.float32, V=40, H=8, min_len=3)
    scale = torch.linspace(-1, 1, b.N)
    labels = b.labels.clamp_min(0)  # the operators take no ignore_index: every row is a target
    expected = rows(b.hidden, b.weight, labels, scale)
    got = torch.compile(rows, backend="aot_eager", fullgraph=True)(b.hidden, b.weight, labels, scale)
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x, y)


# ---- compiled callers --------------------------------------------------------------------------


def tiny_model(b, dtype, D=6, seed=1):
    """Inputs x [N, D] and the parameters of hidden = tanh(x @ A + c) [N, H], plus the head weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b.N, D, generator=g, dtype=torch.float64).to(dtype)
    A = (torch.randn(D, b.H, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    c = (torch.randn(b.H, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    return x, [t.clone().requires_grad_() for t in (A, c, b.weight.to(dtype))]


def fused_step(b, x, params, **opts):
    A, c, W = params
    hidden = torch.tanh(x @ A + c)
    out = wk.fused_linear_wrpo_loss(
        hidden,
        W,
        b.labels,
        b.cu_seqlens,
        ref_logps=b.ref_logps.to(x.dtype),
        backend="torch",
        beta=0.5,
        **opts,
    )
    return out.loss * 2.0, out.logps  # something after the call: a second graph


def run(fn, b, dtype):
    x, params = tiny_model(b, dtype)
    loss, logps = fn(b, x, params, nll_weight=0.3)
    loss.backward()
    return loss.detach(), logps, [p.grad for p in params]


def assert_same(got, expected, tol):
    assert_rel_close(got[0], expected[0], tol, "loss")
    assert_rel_close(got[1], expected[1], tol, "logps")
    for name, g, e in zip(("dA", "dc", "dW"), got[2], expected[2], strict=True):
        assert_rel_close(g, e, tol, name)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_compiled_fused_loss_matches_eager(dtype, rows):
    b = make_batch(B=2, K=3, H=8, V=37, min_len=2, max_len=6, ignore_frac=0.2, seed=3)
    with ROWS[rows]():
        expected = run(fused_step, b, dtype)
        counter = GraphCounter()
        got = run(torch.compile(fused_step, backend=counter), b, dtype)
        assert_same(got, expected, TOL[dtype])
        # the graph before the call and the one after it: dynamo does not trace into the loss
        assert counter.graphs == 2
        got = run(torch.compile(fused_step, backend="aot_eager"), b, dtype)
        assert_same(got, expected, TOL[dtype])


def test_compiled_fused_loss_with_inductor():
    """The default backend on a tiny shape, forward and backward (the native rows on CPU)."""
    b = make_batch(B=1, K=3, H=8, V=16, min_len=2, max_len=4, seed=4)
    expected = run(fused_step, b, torch.float32)
    got = run(torch.compile(fused_step), b, torch.float32)
    assert_same(got, expected, 1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_compiled_linear_logprobs_matches_eager(reduction):
    b = make_batch(B=2, K=3, H=8, V=37, min_len=2, max_len=6, ignore_frac=0.2, seed=5, with_bias=True)

    def step(x, params, bias):
        A, c, W = params
        lp = wk.linear_logprobs(
            torch.tanh(x @ A + c), W, b.labels, b.cu_seqlens, bias=bias, reduction=reduction
        )
        return (lp * torch.linspace(0.5, 1.5, lp.numel(), dtype=lp.dtype)).sum()

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        x, params = tiny_model(b, torch.float64)
        bias = b.bias.clone().requires_grad_()
        out = fn(x, params, bias)
        out.backward()
        results.append((out.detach(), [p.grad for p in (*params, bias)]))
    (got, grads), (expected, expected_grads) = results
    assert_rel_close(got, expected, 1e-12, "sum of log-probs")
    for g, e in zip(grads, expected_grads, strict=True):
        assert_rel_close(g, e, 1e-12, "grad")


def test_compiled_wrpo_loss_matches_eager():
    g = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 30, (3, 3), generator=g)
    ref = -2.5 * lengths + torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def step(scale):
        policy = ref + 3 * torch.tanh(x * scale)
        loss, metrics = wk.wrpo_loss(policy, ref, lengths, loss_type="ipo", beta=0.2)
        return loss * 3.0, metrics["rewards/margins"]

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        loss, margin = fn(scale)
        loss.backward()
        results.append((loss.detach(), margin, scale.grad))
    for got, expected in zip(*results, strict=True):
        assert_rel_close(got, expected, 1e-12, "wrpo_loss")


def test_boundary_keeps_the_public_signatures():
    import inspect

    for fn in (wk.linear_logprobs, wk.fused_linear_wrpo_loss, wk.wrpo_loss):
        assert fn.__wrapped__.__name__ == fn.__name__ and fn.__doc__ == fn.__wrapped__.__doc__
        assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)


def test_import_does_not_import_dynamo():
    """The boundary looks torch.compiler.disable up only while compiling (importing dynamo costs ~1-2 s)."""
    code = "import sys, wrpo_kernels; assert 'torch._dynamo' not in sys.modules, 'dynamo imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
