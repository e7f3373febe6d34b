"""backend="auto": Triton on CUDA only after its self-test passes there; torch otherwise, with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from wrpo_kernels import autoselect, fused_linear_wrpo_loss, triton_backend
from wrpo_kernels.api import resolve_backend


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(autoselect, "_verdicts", {})


def test_auto_is_torch_on_cpu_without_a_self_test(monkeypatch):
    monkeypatch.setattr(autoselect, "triton_self_test", lambda *a: pytest.fail("no self-test on CPU"))
    assert resolve_backend("auto", torch.device("cpu"), torch.float32)[0] == "torch"


def test_auto_picks_triton_on_cuda_when_the_self_test_passes(monkeypatch):
    calls = []
    monkeypatch.setattr(autoselect, "triton_self_test", lambda d, t: calls.append((d, t)))
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autoselect.auto_backend(cuda, torch.bfloat16) == "triton"
        assert autoselect.auto_backend(cuda, torch.bfloat16) == "triton"
    assert calls == [(cuda, torch.bfloat16)]  # once per device and dtype
    assert autoselect.auto_backend(cuda, torch.float64) == "torch"  # the kernels take no fp64


def test_auto_falls_back_to_torch_with_one_warning_naming_the_reason(monkeypatch):
    monkeypatch.setattr(autoselect, "triton_self_test", lambda d, t: "CompilationError: out of resources")
    cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="out of resources"):
        assert autoselect.auto_backend(cuda, torch.float16) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autoselect.auto_backend(cuda, torch.float16) == "torch"  # no second warning


# The self-test itself runs here on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1).


def test_self_test_passes_on_correct_kernels_even_under_no_grad():
    with torch.no_grad():
        assert autoselect.triton_self_test(torch.device("cpu"), torch.float32) is None


def test_self_test_catches_a_wrong_kernel(monkeypatch):
    real = triton_backend.fused_linear_wrpo_loss

    def off_by_a_bit(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * 1.01)

    monkeypatch.setattr(triton_backend, "fused_linear_wrpo_loss", off_by_a_bit)
    reason = autoselect.triton_self_test(torch.device("cpu"), torch.float32)
    assert reason is not None and reason.startswith("loss differs")


def test_self_test_reports_a_failing_kernel(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_backend, "fused_linear_wrpo_loss", broken)
    assert (
        autoselect.triton_self_test(torch.device("cpu"), torch.float32) == "RuntimeError: PTX assembly failed"
    )


def test_explicit_triton_never_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fused_linear_wrpo_loss(
            x,
            torch.randn(5, 4),
            torch.tensor([1, -100, 2, -100, 3, -100]),
            torch.tensor([0, 2, 4, 6]),
            responses_per_prompt=3,
            ref_logps=torch.zeros(1, 3),
            backend="triton",
        )
