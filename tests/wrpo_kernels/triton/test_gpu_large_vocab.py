"""Tensors past 2^31 elements on a GPU: the Triton backend against the torch backend in bf16.

A weight [V, H] with V = 262144 and H = 8256 holds 2.16e9 > 2^31 elements: the forward-only kernel
addresses rows of W past that point, and a chunk of logits [n, V] with n > 8192 does the same in the
row kernels. Offsets computed in int32 would read the wrong memory (or fault); the kernels compute
them in int64 (wrpo_kernels/triton_backend/indexing.py). The ``gpu`` tests need ~25-35 GiB of free
device memory. The same checks run here on CPU tensors at small sizes (the Triton interpreter), so
that the GPU tests' own code is exercised on every run.
"""

from __future__ import annotations

import pytest
import torch

import wrpo_kernels as wk
from wrpo_kernels.api import triton_unavailable_reason

V_BIG, H_BIG = 262144, 8256  # V * H = 2_164_260_864 > 2^31
IGNORE = -100
# The backends round dL/dlogits and the GEMM outputs to bf16 in different places: a few bf16 ulps
# (2^-8 relative) apart. Wrong addresses give errors of order 1.
TOL = 2e-2

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
interpreter = pytest.mark.skipif(
    triton_unavailable_reason(torch.device("cpu")) is not None or torch.cuda.is_available(),
    reason="the small CPU runs go through the Triton interpreter",
)


def need_free_gib(gib: float):
    free = torch.cuda.mem_get_info()[0] / 2**30
    if free < gib:
        pytest.skip(f"needs {gib} GiB of free device memory, {free:.0f} GiB free")


def rel_err(got: torch.Tensor, want: torch.Tensor, rows: int = 8192) -> float:
    """||got - want|| / ||want|| in fp32, a block of rows at a time (no fp64 copy of a [V, H] gradient)."""
    if want.dim() < 2:
        got, want = got.reshape(-1, 1), want.reshape(-1, 1)
    num = den = 0.0
    for a in range(0, want.shape[0], rows):
        g, w = got[a : a + rows].float(), want[a : a + rows].float()
        num += float((g - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else num**0.5


def batch(V, H, device, dtype, *, K=3, groups=2, min_len=3, max_len=9, seed=0):
    """Packed groups whose labels include the last rows of the vocabulary (those past 2^31 / H)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (groups * K,), generator=g)
    N = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = V - 1 - torch.arange(len(labels[::3])) * 7  # the far end of the vocabulary
    labels[1] = IGNORE
    labels[cu[1:] - 1] = IGNORE  # shifted labels: the last position of a sequence predicts nothing
    gen = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, device=device, dtype=torch.float32).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device, dtype=torch.float32) * H**-0.5).to(dtype)
    ref = -lengths.view(groups, K).double() * torch.log(torch.tensor(float(V))) + torch.randn(
        groups, K, generator=g
    )
    return hidden, weight, labels.to(device), cu.to(device), ref.to(device)


def fused_both(V, H, device, dtype, **kw):
    hidden, weight, labels, cu, ref = batch(V, H, device, dtype, **kw.pop("batch", {}))
    out = {}
    for backend in ("torch", "triton"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        res = wk.fused_linear_wrpo_loss(
            h, w, labels, cu, ref_logps=ref, beta=0.1, backend=backend, nll_weight=0.2, **kw
        )
        res.loss.backward()
        out[backend] = {"loss": res.loss.detach(), "logps": res.logps, "dX": h.grad, "dW": w.grad}
        del h, w, res
    return out


def assert_backends_agree(out, tol=TOL):
    for name in ("loss", "logps", "dX", "dW"):
        err = rel_err(out["triton"][name], out["torch"][name])
        assert err <= tol, f"{name}: triton vs torch {err:.2e}"


def forward_only_both(V, H, device, dtype, seed=1):
    hidden, weight, labels, cu, _ = batch(V, H, device, dtype, K=1, groups=6, seed=seed)
    with torch.no_grad():
        return {
            b: wk.linear_logprobs(hidden, weight, labels, cu, reduction="none", backend=b)
            for b in ("torch", "triton")
        }


def forward_only_vs_fp32(V, H, device, dtype, seed=1):
    """Per-token log-probs of the forward-only kernel and of the torch backend (both in ``dtype``), and
    their errors against the same log-probs computed in fp32."""
    hidden, weight, labels, cu, _ = batch(V, H, device, dtype, K=1, groups=6, seed=seed)
    with torch.no_grad():
        got = {
            b: wk.linear_logprobs(hidden, weight, labels, cu, reduction="none", backend=b)
            for b in ("torch", "triton")
        }
        logits = hidden.float() @ weight.float().t()
        valid = labels != IGNORE
        exact = logits.log_softmax(-1).gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
        exact = torch.where(valid, exact, 0.0)
    return {b: rel_err(v, exact) for b, v in got.items()}


def chunk_past_2_31_both(V, H, device, dtype, rows):
    """The fused loss with all ``rows`` labelled tokens in one chunk of logits [rows, V]."""
    K, groups = 3, 6
    per_seq = rows // (K * groups) + 1
    out = fused_both(
        V,
        H,
        device,
        dtype,
        chunk_tokens=K * groups * (per_seq + 1),
        batch={"K": K, "groups": groups, "min_len": per_seq, "max_len": per_seq + 1},
    )
    return out


# ---- GPU: the real sizes ------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_gpu_fused_loss_with_a_weight_past_2_31_elements(loss_type):
    """W [262144, 8256] bf16: loss, log-probs, dX and dW of Triton equal the torch backend's."""
    need_free_gib(40)
    out = fused_both(V_BIG, H_BIG, torch.device("cuda"), torch.bfloat16, loss_type=loss_type)
    assert_backends_agree(out)


@pytest.mark.gpu
@requires_cuda
def test_gpu_forward_only_kernel_with_a_weight_past_2_31_elements():
    """The forward-only kernel reads rows of W past 2^31 elements: its error against fp32 is no worse
    than the torch backend's (which rounds the logits to bf16)."""
    need_free_gib(24)
    err = forward_only_vs_fp32(V_BIG, H_BIG, torch.device("cuda"), torch.bfloat16)
    assert err["triton"] <= 1.5 * err["torch"] + 1e-3, err


@pytest.mark.gpu
@requires_cuda
def test_gpu_row_kernels_on_a_chunk_past_2_31_elements():
    """One chunk of logits [8300, 262144] bf16 (2.18e9 elements) through the row kernels."""
    need_free_gib(24)
    rows = 8300
    assert rows * V_BIG > 2**31
    out = chunk_past_2_31_both(V_BIG, 256, torch.device("cuda"), torch.bfloat16, rows)
    assert out["torch"]["dX"].shape[0] * V_BIG > 2**31
    assert_backends_agree(out)


# ---- CPU: the same checks at small sizes, through the interpreter -------------------------------


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_comparison_at_small_sizes(dtype):
    out = fused_both(509, 40, torch.device("cpu"), dtype, loss_type="dpo")
    assert_backends_agree(out, TOL if dtype != torch.float32 else 1e-5)


@interpreter
def test_forward_only_comparison_at_small_sizes():
    # fp16: the interpreter's tl.dot is wrong on bf16 operands
    err = forward_only_vs_fp32(509, 40, torch.device("cpu"), torch.float16)
    assert err["triton"] <= 1.5 * err["torch"] + 1e-3, err


@interpreter
def test_one_chunk_comparison_at_small_sizes():
    out = chunk_past_2_31_both(300, 16, torch.device("cpu"), torch.bfloat16, rows=60)
    assert_backends_agree(out)
