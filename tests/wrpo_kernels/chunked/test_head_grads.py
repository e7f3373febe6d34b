"""dW accumulation in fp32 without a [V, H] temporary per chunk (wrpo_kernels/chunked/grads.py).

On CUDA with torch >= 2.8 the 16-bit products go straight into the fp32 dW (``addmm``/``mm`` with
``out_dtype`` and ``out=dW``). torch has no CPU kernel for those overloads (2.13 included), so here the
calls are checked on ``meta`` tensors and run through CPU stand-ins registered for the test; the real
cuBLAS path runs in the ``gpu`` test.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, largest_allocation

from wrpo_kernels.chunked import grads as grads_module
from wrpo_kernels.chunked.grads import HAS_FP32_OUT_GEMM, HeadGrads, fp32_out_gemm

needs_out_dtype = pytest.mark.skipif(not HAS_FP32_OUT_GEMM, reason="torch < 2.8: no out_dtype GEMMs")


def chunks(dtype, device="cpu", N=12, H=64, V=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    dlogits = torch.randn(N, V, generator=g, dtype=torch.float64)
    return hidden.to(device, dtype), weight.to(device, dtype), dlogits.to(device, dtype)


def run(grads, hidden, weight, dlogits, tiles=((0, 5), (5, 12))):
    for a, b in tiles:
        grads.add_rows_(dlogits[a:b], a, b, hidden, weight)


def test_no_fp32_out_gemm_on_cpu():
    assert not fp32_out_gemm(torch.device("cpu"))


@pytest.fixture
def cpu_stand_ins(monkeypatch):
    """CPU kernels for aten::mm.dtype_out / aten::addmm.dtype_out (fp32 accumulation into ``out``, no
    temporary of out's size), and the CUDA branch of HeadGrads switched on for CPU tensors."""
    calls = []

    def mm_out(self, mat2, out_dtype, *, out):
        calls.append("mm")
        return torch.mm(self.to(out_dtype), mat2.to(out_dtype), out=out)

    def addmm_out(self, mat1, mat2, out_dtype, *, beta=1, alpha=1, out):
        calls.append("addmm")
        assert self.data_ptr() == out.data_ptr()  # accumulated in place
        return out.addmm_(mat1.to(out_dtype), mat2.to(out_dtype), beta=beta, alpha=alpha)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm.dtype_out", mm_out, "CPU")
    lib.impl("addmm.dtype_out", addmm_out, "CPU")
    monkeypatch.setattr(grads_module, "fp32_out_gemm", lambda device: True)
    yield calls
    lib._destroy()


@needs_out_dtype
def test_cuda_branch_calls_are_well_formed_on_meta(monkeypatch):
    monkeypatch.setattr(grads_module, "fp32_out_gemm", lambda device: True)
    hidden, weight, dlogits = (t.to("meta") for t in chunks(torch.bfloat16))
    grads = HeadGrads(hidden, weight, (True, True, True))
    run(grads, hidden, weight, dlogits)
    assert grads.dW.dtype == torch.float32 and grads.dW.shape == weight.shape


@needs_out_dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_branch_accumulates_in_place_in_fp32(cpu_stand_ins, dtype):
    hidden, weight, dlogits = chunks(dtype)
    grads = HeadGrads(hidden, weight, (False, True, False))
    grads.dW.fill_(float("nan"))  # uninitialised: the first chunk must overwrite, not add
    V, H = weight.shape
    biggest = largest_allocation(lambda: run(grads, hidden, weight, dlogits))
    assert cpu_stand_ins == ["mm", "addmm"]
    assert biggest < V * H * 4 // 4, f"a chunk allocated {biggest} B; dW is {V * H * 4} B"
    exact = dlogits.double().t() @ hidden.double()  # the 16-bit values, products summed exactly
    assert_rel_close(grads.dW, exact, 1e-6, "dW")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fallback_upcasts_chunks_not_dw(dtype):
    """Without fp32-output GEMMs (CPU, older torch): chunk-sized fp32 copies of the operands only."""
    hidden, weight, dlogits = chunks(dtype)
    grads = HeadGrads(hidden, weight, (False, True, False))
    grads.dW.fill_(float("nan"))
    V, H = weight.shape
    biggest = largest_allocation(lambda: run(grads, hidden, weight, dlogits))
    assert biggest < V * H * 4 // 4
    assert_rel_close(grads.dW, dlogits.double().t() @ hidden.double(), 1e-6, "dW")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dw_accumulates_without_a_vh_temporary(dtype):
    hidden, weight, dlogits = chunks(dtype, "cuda", N=256, H=1024, V=32768)
    grads = HeadGrads(hidden, weight, (True, True, True))
    V, H = weight.shape
    tiles = tuple((a, a + 64) for a in range(0, 256, 64))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(grads, hidden, weight, dlogits, tiles)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < V * H * 4 // 4
    assert fp32_out_gemm(hidden.device) == (
        HAS_FP32_OUT_GEMM and torch.cuda.get_device_capability() >= (8, 0)
    )
    _, dW, db = grads.to_input_dtypes(torch.float32, torch.float32)
    exact = dlogits.double().t() @ hidden.double()
    assert_rel_close(dW, exact, 1e-5, "dW")
    assert_rel_close(db, dlogits.double().sum(0), 1e-5, "db")
