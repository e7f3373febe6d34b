"""Error measures between an implementation and its reference, and the largest-allocation probe."""

from __future__ import annotations

import torch


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (computed in fp64); absolute error if expected is all 0."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def rel_norm_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64: the error measure for low-precision comparisons.

    Output roundings to bf16 put the max-abs error at the level of one ulp of the largest entry
    for every implementation; the norm averages that noise out so that ratios of errors are stable.
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff, scale = (a - e).norm().item(), e.norm().item()
    if diff != diff:
        return float("inf")
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, tol: float, what: str = "") -> None:
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation any single op made while running ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)
