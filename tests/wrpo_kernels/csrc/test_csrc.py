"""Native CPU row kernels (csrc/, torch.ops.wrpo_kernels): operators against fp64, the torch backend
with and without them, the pure-torch fallback, lazy loading and packaging.

The first test that needs the kernels compiles them (once per machine and source version).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import IGNORE, assert_rel_close, check_all_close, fused, make_batch, rel_norm_err, resolve_chunk

import wrpo_kernels as wk
from wrpo_kernels import native, torch_backend
from wrpo_kernels.torch_backend.native_rows import NATIVE_ROW_OPS, padded_tokens
from wrpo_kernels.torch_backend.torch_rows import TORCH_ROW_OPS

ROOT = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")
LOWP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"fp64": torch.float64, **LOWP}
# (softcap, temperature): plain, temperature only, softcap only, both
HEADS = [(None, 1.0), (None, 0.7), (30.0, 1.0), (3.0, 1.3)]
# (tokens n, vocabulary V): n around the vector step (16 fp32 lanes), V below and above the 8-row
# blocks and the 256-row minimum slice per thread of lse_target
SHAPES = [(1, 1), (1, 37), (5, 7), (16, 300), (17, 16), (40, 4099)]


@pytest.fixture(scope="module")
def ops():
    if os.environ.get(native.ENV_DISABLE, "") not in ("", "0"):
        pytest.skip(f"{native.ENV_DISABLE} is set")
    if not native.load():
        pytest.skip(
            "the native kernels did not build here (see test_extension_builds_with_the_compiler_here)"
        )
    return torch.ops.wrpo_kernels


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as in a new process: nothing tried, nothing warned (restored afterwards)."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_warned", False)


def head_fp64(x, softcap, temperature):
    z = x.to(torch.float64)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def random_tokens(n, V, dtype, seed):
    """x [n, V] logits of n tokens (rounded to ``dtype``), labels [n], scale [n] (every 3rd token 0)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, V, generator=g, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    scale = torch.randn(n, generator=g, dtype=torch.float64)
    scale[::3] = 0.0  # ignored rows
    return x, labels, scale


def native_ops_seen(fn) -> set[str]:
    """Names of the wrpo_kernels operators that ran during ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("wrpo_kernels::")}


# ---- build and load ----------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None,
    reason="no C++ compiler or ninja on PATH",
)
def test_extension_builds_with_the_compiler_here():
    """Where a compiler is present the kernels must build (a silent fallback would hide a broken build)."""
    if os.environ.get(native.ENV_DISABLE, "") not in ("", "0"):
        pytest.skip(f"{native.ENV_DISABLE} is set")
    assert native.load()
    assert native.row_kernels_enabled(CPU)
    assert torch_backend.row_ops(CPU) is NATIVE_ROW_OPS


def test_import_compiles_nothing(tmp_path):
    code = (
        "import torch, wrpo_kernels, wrpo_kernels.torch_backend\n"
        "assert not any(hasattr(torch.ops.wrpo_kernels, op) for op in wrpo_kernels.native.OPS)\n"
        "assert wrpo_kernels.native._loaded is None\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("capability", "isa"),
    [
        ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
        ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]),
        ("DEFAULT", []),
    ],
)
def test_build_flags_follow_aten_cpu_capability(capability, isa):
    flags = native.build_flags(capability)
    assert "-O3" in flags and "-fopenmp" in flags and "-march=native" not in flags
    assert [f for f in flags if f.startswith("-m")] == isa
    assert f"-DCPU_CAPABILITY=wrpo_{capability.lower()}" in flags


def test_sources_ship_with_the_package():
    """pyproject lists every package (it cannot find csrc/ by itself) and maps csrc/ into wrpo_kernels."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("wrpo", "wrpo_kernels")
        for p in (ROOT / top).rglob("*")
        if p.is_file() and p.suffix in (".py", ".jsonl") and "__pycache__" not in p.parts
    }
    assert on_disk | {"wrpo_kernels.csrc"} == set(cfg["packages"])
    assert cfg["package-dir"] == {"wrpo_kernels.csrc": "csrc"}
    assert set(cfg["package-data"]["wrpo_kernels.csrc"]) == {"*.cpp", "*.h"}
    assert native.source_dir() == ROOT / "csrc"
    assert {p.name for p in native.source_dir().glob("*.cpp")} == set(native.SOURCES)


# ---- the operators against fp64 -------------------------------------------------------------------
# The kernels take a chunk's logits vocab-major, logits_t [V, n]; the references work on x = logits_t^T.


@pytest.mark.parametrize(("softcap", "temperature"), HEADS)
@pytest.mark.parametrize(("n", "V"), SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_target_match_fp64(ops, dtype, n, V, softcap, temperature):
    """lse and target logit of the tokens as stored (the fp64 truth on the same rounded values)."""
    x, labels, _ = random_tokens(n, V, DTYPES[dtype], seed=V + n)
    lse, target = ops.lse_target(x.t().contiguous(), labels, softcap, temperature)
    z = head_fp64(x, softcap, temperature)
    assert lse.dtype == target.dtype == (torch.float64 if dtype == "fp64" else torch.float32)
    tol = 1e-12 if dtype == "fp64" else 1e-5
    assert_rel_close(lse, z.logsumexp(1), tol, "lse")
    assert_rel_close(target, z.gather(1, labels[:, None]).squeeze(1), tol, "target")


@pytest.mark.parametrize(("softcap", "temperature"), HEADS)
@pytest.mark.parametrize(("n", "V"), SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_grad_matches_fp64_autograd(ops, dtype, n, V, softcap, temperature):
    """In place dL/dx for L = sum_t scale_t log p_t[label_t], against autograd through the fp64 head."""
    x, labels, scale = random_tokens(n, V, DTYPES[dtype], seed=V + n + 1)
    xd = x.to(torch.float64).requires_grad_()
    logp = head_fp64(xd, softcap, temperature).log_softmax(1).gather(1, labels[:, None]).squeeze(1)
    (logp * scale).sum().backward()
    truth = xd.grad
    md = torch.float64 if dtype == "fp64" else torch.float32
    lse = head_fp64(x, softcap, temperature).logsumexp(1).to(md)
    g_t = x.t().contiguous()
    ops.logit_grad_(g_t, labels, scale.to(md), lse, softcap, temperature)
    g = g_t.t()
    assert g.dtype == x.dtype
    assert torch.equal(g[scale == 0], torch.zeros_like(g[scale == 0])), "ignored tokens get zeros"
    if dtype == "fp64":
        assert_rel_close(g, truth, 1e-12, "dx")
    else:  # no worse than rounding the exact gradient to the logits dtype (+ fp32 math)
        err, rounding = rel_norm_err(g, truth), rel_norm_err(truth.to(x.dtype), truth)
        assert err <= 1.5 * rounding + 1e-5, f"dx: {err:.2e} vs rounding {rounding:.2e}"


@pytest.mark.parametrize("threads", [1, 2])
def test_vocab_split_across_threads_agrees(ops, threads):
    """With 2 threads the vocabulary is cut in two slices whose (max, sum) pairs are merged."""
    x, labels, scale = random_tokens(203, 1000, torch.float32, seed=5)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lse, target = ops.lse_target(x.t().contiguous(), labels, 5.0, 0.9)
        g_t = x.t().contiguous()
        ops.logit_grad_(g_t, labels, scale.float(), lse, 5.0, 0.9)
    finally:
        torch.set_num_threads(prev)
    z = head_fp64(x, 5.0, 0.9)
    assert_rel_close(lse, z.logsumexp(1), 1e-5, "lse")
    assert_rel_close(target, z.gather(1, labels[:, None]).squeeze(1), 1e-5, "target")
    expect = scale[:, None] / 0.9 * (F.one_hot(labels, 1000) - (z - z.logsumexp(1, keepdim=True)).exp())
    assert_rel_close(g_t.t(), expect * (1 - torch.tanh(x.double() / 5.0) ** 2), 1e-5, "grad")


@pytest.mark.parametrize("threads", [1, 2])
def test_lse_target_with_logits_far_apart_along_the_vocabulary(ops, threads):
    """Spikes far above the first rows' values and leading -inf rows move the running shift mid-sweep."""
    g = torch.Generator().manual_seed(9)
    n, V = 21, 1500
    x = torch.randn(n, V, generator=g, dtype=torch.float64)
    x[torch.arange(n), (97 * torch.arange(n) + 300) % V] += 150.0  # one spike per token, late in the sweep
    x[::3, :400] = -float("inf")  # every third token: nothing finite in the first 400 rows
    x[1, 1000:] += 80.0  # a second, smaller jump for token 1
    labels = torch.randint(0, V, (n,), generator=g)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lse, _ = ops.lse_target(x.float().t().contiguous(), labels, None, 1.0)
    finally:
        torch.set_num_threads(prev)
    assert_rel_close(lse, x.float().double().logsumexp(1), 1e-6, "lse")


def test_kernels_take_a_slice_of_a_wider_buffer(ops):
    """logits_t [V, n] may be a column slice of a wider buffer (row stride > n)."""
    x, labels, scale = random_tokens(5, 50, torch.float32, seed=3)
    wide = torch.full((50, 21), 1e6)
    wide[:, :5] = x.t()
    lse, _ = ops.lse_target(wide[:, :5], labels, None, 1.0)
    assert_rel_close(lse, x.double().logsumexp(1), 1e-5, "lse")
    ops.logit_grad_(wide[:, :5], labels, scale.float(), lse, None, 1.0)
    assert torch.equal(wide[:, 5:], torch.full((50, 16), 1e6)), "columns beyond n are left alone"


def test_infinite_and_nan_logits(ops):
    x = torch.tensor(
        [[0.0, -float("inf"), 1.0], [-float("inf"), -float("inf"), 2.0], [0.0, float("nan"), 1.0]]
    )
    labels = torch.tensor([0, 2, 0])
    lse, _ = ops.lse_target(x.t().contiguous(), labels, None, 1.0)
    assert_rel_close(lse[:2], x[:2].double().logsumexp(1), 1e-6, "lse with -inf")
    assert torch.isnan(lse[2]), "a NaN logit makes its token's lse NaN"
    g_t = x.t().contiguous()
    ops.logit_grad_(g_t, labels, torch.ones(3), lse, None, 1.0)
    g = g_t.t()
    assert g[0, 1] == 0 and g[1, 0] == 0 and g[1, 2].abs() < 1e-6
    assert torch.isnan(g[2]).all(), "a token with a NaN lse gets a NaN gradient"


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_chunk_rows_are_padded_to_an_odd_number_of_cache_lines(itemsize):
    for n in (0, 1, 7, 31, 32, 33, 1533, 1536, 4096):
        ld = padded_tokens(n, itemsize)
        lines, rest = divmod(ld * itemsize, 64)
        assert ld >= n and rest == 0 and lines % 2 == 1 and ld - n <= 2 * 64 // itemsize


def test_workspace_is_a_writable_buffer_of_the_requested_shape(ops):
    for rows, cols, dtype in ((3, 5, torch.bfloat16), (600, 1024, torch.float32)):  # < and > one 2 MiB page
        ws = ops.workspace(rows, cols, dtype)
        assert ws.shape == (rows, cols) and ws.dtype == dtype and ws.is_contiguous()
        ws.fill_(2.0)
        assert float(ws.sum()) == 2.0 * rows * cols


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (lambda x, lab: (x, lab.int(), None, 1.0), "labels must be Long"),
        (lambda x, lab: (x, lab + 100, None, 1.0), r"label 1\d\d of token 0 is outside \[0, 9\)"),
        (lambda x, lab: (x[0], lab, None, 1.0), "logits_t must be 2-D"),
        (lambda x, lab: (x.t(), lab, None, 1.0), "tokens of a vocab row of logits_t must be contiguous"),
        (lambda x, lab: (x.int(), lab, None, 1.0), "logits_t must be fp32, fp64, bf16 or fp16"),
        (lambda x, lab: (x, lab[:2], None, 1.0), r"labels must be a contiguous CPU tensor of shape \[9\]"),
        (lambda x, lab: (x, lab, 0.0, 1.0), "softcap must be > 0"),
        (lambda x, lab: (x, lab, None, 0.0), "temperature must be > 0"),
    ],
    ids=[
        "int32-labels",
        "label-range",
        "1d",
        "strided-tokens",
        "int-logits",
        "short-labels",
        "softcap",
        "temp",
    ],
)
def test_lse_target_rejects_bad_arguments_clearly(ops, args, match):
    x, labels, _ = random_tokens(9, 9, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=match):
        ops.lse_target(*args(x.t().contiguous(), labels))


def test_logit_grad_rejects_a_math_dtype_mismatch(ops):
    x, labels, scale = random_tokens(4, 9, torch.bfloat16, seed=0)
    with pytest.raises(RuntimeError, match="scale must be Float"):
        ops.logit_grad_(x.t().contiguous(), labels, scale, torch.zeros(4), None, 1.0)


# ---- the torch backend with and without the extension ---------------------------------------------


def run_both(fn):
    """fn() with the native row ops and with the pure-torch ones; asserts which ones ran."""
    ours = {}
    seen = native_ops_seen(lambda: ours.update(fn()))
    assert seen == {f"wrpo_kernels::{op}" for op in native.OPS}, seen
    with native.disabled():
        plain = {}
        assert native_ops_seen(lambda: plain.update(fn())) == set()
    return ours, plain


@pytest.mark.parametrize(("softcap", "temperature"), HEADS)
@pytest.mark.parametrize("chunk", [None, "group", 5])
@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
def test_fused_loss_same_with_and_without_extension_fp64(ops, loss_type, chunk, softcap, temperature):
    batch = make_batch(B=3, K=3, H=13, V=2053, seed=7, min_len=1, max_len=7, ignore_frac=0.3, with_bias=True)
    opts = {"loss_type": loss_type, "beta": 0.2, "softcap": softcap, "temperature": temperature}
    kw = {"chunk_tokens": resolve_chunk(chunk, batch), "nll_weight": 0.3}
    ours, plain = run_both(lambda: fused(batch, "torch", **kw, **opts))
    check_all_close(ours, plain, 1e-12, "native vs pure torch")
    check_all_close(ours, fused(batch, "reference", nll_weight=0.3, **opts), 1e-10, "native vs reference")


@pytest.mark.parametrize(("softcap", "temperature"), HEADS)
@pytest.mark.parametrize("K", [2, 3, 4])
def test_fused_loss_fp32_matches_fp64_reference(ops, K, softcap, temperature):
    batch = make_batch(B=2, K=K, H=20, V=1031, seed=K, min_len=1, max_len=9, ignore_frac=0.2, with_bias=True)
    opts = {"num_chosen": K - 1, "beta": 0.3, "softcap": softcap, "temperature": temperature}
    ours, plain = run_both(lambda: fused(batch, "torch", dtype=torch.float32, **opts))
    ref = fused(batch, "reference", **opts)
    check_all_close(ours, ref, 1e-4, "native fp32 vs fp64 reference")
    for name in ("loss", "logps", "dX", "dW", "db"):
        err, err_plain = rel_norm_err(ours[name], ref[name]), rel_norm_err(plain[name], ref[name])
        assert err <= 1.5 * err_plain + 1e-6, f"{name}: native {err:.2e} vs pure torch {err_plain:.2e}"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize(("softcap", "temperature"), [(None, 1.0), (4.0, 0.8)])
def test_fused_loss_low_precision_no_worse_than_naive(ops, dtype, softcap, temperature):
    """Low-precision bar: error vs fp64 (same rounded inputs) within 1.5x the naive path's in the dtype."""
    dt = LOWP[dtype]
    batch = make_batch(B=3, K=3, H=24, V=517, seed=11, min_len=2, max_len=12, ignore_frac=0.2).cast(dt)
    opts = {"beta": 0.3, "softcap": softcap, "temperature": temperature}
    truth = fused(batch, "reference", dtype=torch.float64, **opts)
    naive = fused(batch, "reference", **opts)
    ours, _ = run_both(lambda: fused(batch, "torch", **opts))
    for name in ("loss", "logps", "dX", "dW"):
        err, err_naive = rel_norm_err(ours[name], truth[name]), rel_norm_err(naive[name], truth[name])
        assert err <= 1.5 * err_naive + 1e-3, f"{name}: native {err:.2e} vs naive {err_naive:.2e}"


def logprobs_with_grads(batch, reduction, dtype=None, **head):
    h, w, b = batch.params(dtype)
    out = wk.linear_logprobs(
        h,
        w,
        batch.labels,
        batch.cu_seqlens,
        bias=b,
        reduction=reduction,
        backend="torch",
        chunk_tokens=7,
        **head,
    )
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)).sum().backward()
    return {"logps": out.detach(), "dX": h.grad, "dW": w.grad, "db": b.grad}


@pytest.mark.parametrize(("softcap", "temperature"), HEADS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_linear_logprobs_same_with_and_without_extension(ops, reduction, softcap, temperature):
    """Odd shapes: 1-token sequences and, for sum/none, sequences with no labelled token at all."""
    lengths = [1, 5, 1, 9, 3, 1]
    batch = make_batch(
        B=2,
        K=3,
        H=11,
        V=2071,
        seed=2,
        lengths=lengths,
        ignore_frac=0.4,
        with_bias=True,
        allow_empty=reduction != "mean",
    )
    if reduction != "mean":
        batch.labels[batch.cu_seqlens[3] : batch.cu_seqlens[4]] = IGNORE  # a fully ignored sequence
    head = {"softcap": softcap, "temperature": temperature}
    ours, plain = run_both(lambda: logprobs_with_grads(batch, reduction, **head))
    h, w, b = batch.params()
    ref = wk.linear_logprobs(
        h, w, batch.labels, batch.cu_seqlens, bias=b, reduction=reduction, backend="reference", **head
    )
    for name in ("logps", "dX", "dW", "db"):
        assert_rel_close(ours[name], plain[name], 1e-12, f"{name} native vs pure torch")
    assert_rel_close(ours["logps"], ref, 1e-10, "logps vs reference")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_logprobs_low_precision_no_worse_than_naive(ops, dtype):
    dt = LOWP[dtype]
    batch = make_batch(B=2, K=3, H=16, V=333, seed=4, min_len=1, max_len=10, ignore_frac=0.2, with_bias=True)
    batch = batch.cast(dt)
    truth = logprobs_with_grads(batch, "none", dtype=torch.float64)
    h, w, b = batch.params()
    naive_out = wk.linear_logprobs(
        h, w, batch.labels, batch.cu_seqlens, bias=b, reduction="none", backend="reference"
    )
    (naive_out * torch.linspace(0.5, 1.5, naive_out.numel())).sum().backward()
    naive = {"logps": naive_out.detach(), "dX": h.grad, "dW": w.grad, "db": b.grad}
    ours, _ = run_both(lambda: logprobs_with_grads(batch, "none"))
    slack = 1e-6 if dtype == "fp32" else 1e-3
    for name in ("logps", "dX", "dW", "db"):
        err, err_naive = rel_norm_err(ours[name], truth[name]), rel_norm_err(naive[name], truth[name])
        assert err <= 1.5 * err_naive + slack, f"{name}: native {err:.2e} vs naive {err_naive:.2e}"


def test_cuda_and_switched_off_calls_use_the_pure_torch_row_ops(ops):
    assert torch_backend.row_ops(CPU) is NATIVE_ROW_OPS
    assert torch_backend.row_ops(torch.device("cuda")) is TORCH_ROW_OPS
    with native.disabled():
        assert torch_backend.row_ops(CPU) is TORCH_ROW_OPS
    assert torch_backend.row_ops(CPU) is NATIVE_ROW_OPS


# ---- fallback ------------------------------------------------------------------------------------


def fused_twice_without_native(batch):
    """Two fused calls that must run on the pure-torch row ops; returns the warnings they raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            res = {}
            assert native_ops_seen(lambda res=res: res.update(fused(batch, "torch", beta=0.3))) == set()
            check_all_close(res, fused(batch, "reference", beta=0.3), 1e-10, "fallback vs reference")
    return [w for w in caught if "native CPU row kernels unavailable" in str(w.message)]


def test_env_switch_runs_pure_torch_and_warns_once(monkeypatch, fresh_loader):
    monkeypatch.setenv(native.ENV_DISABLE, "1")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("WRPO_KERNELS_NO_EXT=1 must not build"))
    said = fused_twice_without_native(make_batch(B=2, K=3, H=6, V=29, seed=1))
    assert len(said) == 1 and "WRPO_KERNELS_NO_EXT=1" in str(said[0].message)


def test_failed_build_falls_back_to_pure_torch_and_warns_once(monkeypatch, fresh_loader):
    monkeypatch.delenv(native.ENV_DISABLE, raising=False)

    def broken_build():
        raise RuntimeError("Error building extension: simulated compiler failure")

    monkeypatch.setattr(native, "_build", broken_build)
    said = fused_twice_without_native(make_batch(B=2, K=3, H=6, V=29, seed=2))
    assert len(said) == 1 and "simulated compiler failure" in str(said[0].message)
    assert native._loaded is False  # tried once, not again on every call


@pytest.mark.parametrize(
    ("env", "platform", "match"),
    [({"CXX": "/nonexistent/c++"}, "linux", r"no C\+\+ compiler"), ({}, "darwin", "Linux only")],
    ids=["no-compiler", "not-linux"],
)
def test_unbuildable_setups_are_reported_without_compiling(monkeypatch, fresh_loader, env, platform, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(native.sys, "platform", platform)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: pytest.fail("must not compile"))
    with pytest.warns(RuntimeWarning, match=match):
        assert native.load() is False


def test_build_directory_is_under_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = native.build_directory("wrpo_kernels_rows_test")
    assert d.is_dir() and d.parent.parent == tmp_path and d.name == "wrpo_kernels_rows_test"
    assert torch.__version__.replace("+", "_") in d.parent.name


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A killed build leaves its lock; cpp_extension would wait for it forever in every later process."""
    lock = tmp_path / "lock"
    lock.touch()
    assert not native.clear_stale_lock(tmp_path) and lock.exists()  # a build may be running
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match=r"removed .*lock, a build lock 11 min old"):
        assert native.clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert not native.clear_stale_lock(tmp_path)  # nothing to remove
