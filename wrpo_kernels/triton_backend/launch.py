"""Kernel launches as data, so that what the backend runs can also be compiled ahead of time.

Every launcher of this package builds a :class:`Launch` (kernel, grid, runtime arguments, constexprs,
warps, stages) and hands it to :func:`launch`. Inside :func:`recording` nothing runs: the launches are
collected instead, for a chosen GPU architecture, from the very same launcher code run on ``meta``
tensors. ``wrpo_kernels.triton_backend.aot`` compiles what it records for sm_80 and sm_90 without a
GPU (tests/wrpo_kernels/triton/test_triton_compile.py), so no kernel, flag or tile choice the launchers
can reach is left out of that check.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default

    def options(self) -> dict:
        opts = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts


@dataclass
class _Recorder:
    arch: int
    launches: list = field(default_factory=list)


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("wrpo_triton_rec", default=None)


def launch(spec: Launch):
    """Run the launch, or record it inside :func:`recording`."""
    rec = _RECORDER.get()
    if rec is not None:
        rec.launches.append(spec)
        return None
    return spec.kernel[spec.grid](*spec.args, **spec.constexprs, **spec.options())


@contextlib.contextmanager
def recording(arch: int):
    """Collect (not run) the launches made inside, configured for an sm_<arch> device (80, 90, ...)."""
    rec = _Recorder(arch)
    token = _RECORDER.set(rec)
    try:
        yield rec.launches
    finally:
        _RECORDER.reset(token)


def device_arch(device: torch.device) -> int | None:
    """Compute capability as 10 * major + minor (80: A100, 90: H100) of ``device``; the recorded
    architecture inside :func:`recording`; None for CPU tensors (the Triton interpreter)."""
    rec = _RECORDER.get()
    if rec is not None:
        return rec.arch
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
