"""The Triton backend: its kernels really launch, memory, precision, refusals (fp32 parity with the fp64
reference: tests/wrpo_kernels/parity/).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16: the interpreter's
tl.dot is wrong on bf16 operands). Tests marked ``gpu`` run bf16 and large vocabularies on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    check_all_close,
    fused,
    largest_allocation,
    make_batch,
    rel_norm_err,
    resolve_chunk,
)

import wrpo_kernels as wk
from wrpo_kernels.api import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    triton_unavailable_reason(DEVICE) is not None, reason=str(triton_unavailable_reason(DEVICE))
)
TOL32 = 2e-4  # fp32 Triton vs fp64 reference


def gpu(test):
    """The registered ``gpu`` marker (``pytest -m gpu`` selects it), skipped without a CUDA device."""
    return pytest.mark.gpu(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    )


def on_device(batch):
    for name in ("hidden", "weight", "bias", "labels", "cu_seqlens", "ref_logps"):
        t = getattr(batch, name)
        if t is not None:
            setattr(batch, name, t.to(DEVICE))
    return batch


def assert_no_worse_than_naive(batch, dtype, **opts):
    """The low-precision bar: Triton's error vs fp64 within 1.5x the naive path's in ``dtype`` (+1e-3)."""
    ref = fused(batch, "reference", **opts)
    naive = fused(batch, "reference", dtype=dtype, **opts)
    ours = fused(batch, "triton", dtype=dtype, **opts)
    for name in ("loss", "logps", "dX", "dW"):
        err, err_naive = rel_norm_err(ours[name], ref[name]), rel_norm_err(naive[name], ref[name])
        assert err <= 1.5 * err_naive + 1e-3, f"{name}: triton {err:.2e} vs naive {err_naive:.2e}"


@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_fused_loss_fp16_error_no_worse_than_naive(loss_type):
    batch = on_device(make_batch(B=2, K=3, H=24, V=101, seed=3, max_len=12))
    assert_no_worse_than_naive(batch, torch.float16, loss_type=loss_type)


def _count_launches(monkeypatch):
    """Wrap every Triton kernel of the backend so that its launches are counted."""
    from wrpo_kernels.triton_backend import forward_kernel, loss_kernel, row_kernels

    counts = {}

    class Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts[self.name] = counts.get(self.name, 0) + 1
                return self.fn[grid](*args, **kwargs)

            return launch

    for module in (row_kernels, loss_kernel, forward_kernel):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Counted(name, getattr(module, name)))
    return counts


def _forbid_torch_row_work(monkeypatch):
    """Make the torch backend's row work and loss raise, so that any fallback to it fails the test."""
    from wrpo_kernels.torch_backend import torch_rows as rows

    def boom(*args, **kwargs):
        raise AssertionError("the torch backend's row work ran under backend='triton'")

    for name in ("head_logits_", "softmax_stats_", "softmax_grad_", "group_loss_and_grad", "segment_sum"):
        monkeypatch.setattr(rows, name, boom)


def test_fused_loss_really_launches_triton_kernels(monkeypatch):
    counts = _count_launches(monkeypatch)
    _forbid_torch_row_work(monkeypatch)
    batch = on_device(make_batch(B=2, K=3, H=8, V=40, seed=1))
    ref = fused(batch, "reference")
    ours = fused(batch, "triton", dtype=torch.float32, chunk_tokens=resolve_chunk("group", batch))
    check_all_close(ours, ref, TOL32, "counted")
    assert counts["_row_stats_kernel"] == 2 and counts["_row_grad_kernel"] == 2  # one chunk per group
    assert counts["_group_loss_kernel"] == 2
    assert "_forward_logprobs_kernel" not in counts


def test_no_grad_logprobs_use_the_forward_only_kernel(monkeypatch):
    counts = _count_launches(monkeypatch)
    _forbid_torch_row_work(monkeypatch)
    batch = on_device(make_batch(B=3, K=2, H=8, V=40, seed=2))
    with torch.no_grad():
        wk.linear_logprobs(
            batch.hidden.float(), batch.weight.float(), batch.labels, batch.cu_seqlens, backend="triton"
        )
    assert counts == {"_forward_logprobs_kernel": 1}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the profiler probe watches CPU allocations")
def test_forward_only_kernel_allocates_no_logits_buffer():
    B, H, V = 10, 16, 400
    batch = make_batch(B=B, K=1, H=H, V=V, seed=4, min_len=20, max_len=30)
    N = batch.N
    h, w, _ = batch.params(torch.float32, requires_grad=False)

    def run():
        wk.linear_logprobs(h, w, batch.labels, batch.cu_seqlens, backend="triton")

    biggest = largest_allocation(run)
    assert biggest < N * V * 4 // 8, f"largest allocation {biggest} B vs logits {N * V * 4} B"
    # the probe does see the reference path allocate its logits
    assert (
        largest_allocation(
            lambda: wk.linear_logprobs(h, w, batch.labels, batch.cu_seqlens, backend="reference")
        )
        >= N * V * 4
    )


def test_triton_backend_rejects_fp64():
    batch = on_device(make_batch(B=1, K=2))
    with pytest.raises(ValueError, match="backend='triton' takes fp32, fp16 or bf16"):
        fused(batch, "triton", num_chosen=1)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU rule")
def test_triton_backend_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    batch = make_batch(B=1, K=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fused(batch, "triton", num_chosen=1)


@gpu
@pytest.mark.parametrize("V", [128256, 262144])
@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_gpu_bf16_large_vocab_no_worse_than_naive(V, loss_type):
    batch = on_device(make_batch(B=2, K=3, H=256, V=V, seed=0, min_len=40, max_len=90, ignore_frac=0.1))
    assert_no_worse_than_naive(batch, torch.bfloat16, loss_type=loss_type)


@gpu
def test_gpu_bf16_forward_only_logprobs():
    batch = on_device(make_batch(B=8, K=1, H=512, V=128256, seed=1, min_len=50, max_len=200))
    h, w, _ = batch.params(torch.float64, requires_grad=False)
    expected = wk.linear_logprobs(h, w, batch.labels, batch.cu_seqlens, backend="reference")
    naive = wk.linear_logprobs(
        h.bfloat16(), w.bfloat16(), batch.labels, batch.cu_seqlens, backend="reference"
    )
    with torch.no_grad():
        got = wk.linear_logprobs(h.bfloat16(), w.bfloat16(), batch.labels, batch.cu_seqlens, backend="triton")
    assert rel_norm_err(got, expected) <= 1.5 * rel_norm_err(naive, expected) + 1e-3
