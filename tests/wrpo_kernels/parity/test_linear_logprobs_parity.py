"""linear_logprobs on every backend against the fp64 reference backend: per-sequence (sum, mean) and
per-token (none) log-probs and, under a random upstream gradient, dX, dW and db (docs/method.md §2, §6)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_rel_close, make_batch, max_rel_err
from helpers.backends import REFERENCE, TORCH, TORCH_NOCSRC, TRITON, cases

from wrpo_kernels import linear_logprobs

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}  # fp32: Triton's kernels vs the fp64 reference


@dataclass
class Case:
    id: str
    batch: dict  # make_batch arguments
    reduction: str
    chunk: int | None
    head: dict  # softcap, temperature
    grad: bool = True  # False: forward only (no_grad)
    seed: int = 1  # of the upstream gradient


def run(batch, backend, dtype, case):
    """Forward (+ backward of sum(out * g), g random); returns (out, dX, dW, db), None where not run."""
    h, w, b = batch.params(dtype, requires_grad=case.grad)
    kw = {"chunk_tokens": case.chunk} if backend.chunked else {}
    with backend.calls(), torch.set_grad_enabled(case.grad):
        out = linear_logprobs(
            h,
            w,
            batch.labels,
            batch.cu_seqlens,
            bias=b,
            reduction=case.reduction,
            backend=backend.name,
            **case.head,
            **kw,
        )
    if not case.grad:
        return out, None, None, None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    with backend.calls():
        (out * g.to(out.device, out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


REDUCTIONS = ("sum", "mean", "none")
SHAPES = [
    Case(
        f"{reduction}-chunk{chunk}-V{V}-H{H}-bias{with_bias}",
        {
            "B": 2,
            "K": 3,
            "H": H,
            "V": V,
            "seed": V + H,
            "min_len": 1,
            "max_len": 7,
            "ignore_frac": 0.3,
            "with_bias": with_bias,
        },
        reduction,
        chunk,
        {},
    )
    for reduction in REDUCTIONS
    for chunk in (1, 3, 7, None)
    for V, H, with_bias in ((37, 5, True), (101, 24, False), (2, 1, True))
]
HEADS = [
    Case(
        f"{reduction}-softcap{softcap}-T{temperature}-chunk{chunk}",
        {"B": 2, "K": 2, "H": 6, "V": 29, "seed": 7, "max_len": 6, "ignore_frac": 0.2, "with_bias": True},
        reduction,
        chunk,
        {"softcap": softcap, "temperature": temperature},
    )
    for reduction in REDUCTIONS
    for softcap, temperature in ((2.0, 1.0), (None, 0.7), (1.5, 1.8))
    for chunk in (3, None)
]
# N, V and H larger than one tile of the forward kernel in each dimension (fp32: 32 x 64 x 32)
TRITON_TILES = [
    Case(
        f"{reduction}-{'two-pass' if grad else 'forward-only'}-S{S}-H{H}-V{V}",
        {"B": S, "K": 1, "H": H, "V": V, "seed": S, "max_len": 9, "ignore_frac": 0.2, "with_bias": True},
        reduction,
        16,
        {"softcap": 3.0, "temperature": 0.9},
        grad=grad,
        seed=0,
    )
    for reduction in REDUCTIONS
    for grad in (True, False)
    for S, H, V in ((4, 20, 67), (30, 70, 300))
]


def check_against_reference(backend, case):
    batch = backend.on_device(make_batch(**case.batch))
    grad_case = Case(**{**case.__dict__, "grad": True})
    expected = run(batch, REFERENCE, torch.float64, grad_case)
    ours = run(batch, backend, backend.dtype, case)
    tol = TOL[backend.dtype]
    for name, a, e in zip(("logps", "dX", "dW", "db"), ours, expected, strict=True):
        if name != "logps" and not case.grad:
            continue
        if e is None:
            assert a is None, f"{case.id} {name}: expected no gradient"
            continue
        assert_rel_close(a, e, tol, f"{backend.id} {case.id} {name}")
    return ours


@pytest.mark.parametrize(
    ("backend", "case"), cases({TORCH: SHAPES, TORCH_NOCSRC: SHAPES, TRITON: TRITON_TILES})
)
def test_logps_and_gradients_match_fp64_reference(backend, case):
    check_against_reference(backend, case)


@pytest.mark.parametrize(("backend", "case"), cases({TORCH: HEADS, TORCH_NOCSRC: HEADS}))
def test_softcap_and_temperature_match_fp64_reference(backend, case):
    ours = check_against_reference(backend, case)
    plain = run(make_batch(**case.batch), backend, backend.dtype, Case(**{**case.__dict__, "head": {}}))
    assert max_rel_err(ours[0], plain[0]) > 1e-6, "softcap/temperature had no effect"
