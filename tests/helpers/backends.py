"""The backends every parity check runs on (tests/wrpo_kernels/parity), and how each one is called.

- ``torch``: the chunked torch backend; on CPU its row work goes to the C++ row kernels (csrc/) when
  they build here.
- ``torch-nocsrc``: the same backend with the C++ row kernels switched off (``native.disabled()``).
- ``triton``: the Triton kernels, fp32 (the interpreter's tl.dot is wrong on bf16 operands); on a
  CPU-only machine they run under ``TRITON_INTERPRET=1``, which tests/conftest.py sets before any
  test imports triton.
- ``reference``: the naive fp64 oracle, where a check has an oracle of its own (the full logits).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import pytest
import torch

from wrpo_kernels import native
from wrpo_kernels.api import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Backend:
    id: str
    name: str  # the backend= argument
    dtype: torch.dtype  # what the fp64 cases run in
    csrc: bool = True  # False: the torch backend without its C++ row kernels
    device: torch.device = torch.device("cpu")

    @property
    def chunked(self) -> bool:
        return self.name != "reference"

    @property
    def skip_reason(self) -> str | None:
        return triton_unavailable_reason(self.device) if self.name == "triton" else None

    def calls(self):
        """The context every call of this backend runs in."""
        return contextlib.nullcontext() if self.csrc else native.disabled()

    def moved_to(self, device: torch.device) -> Backend:
        return replace(self, device=device)

    def on_device(self, batch):
        for name in ("hidden", "weight", "bias", "labels", "cu_seqlens", "ref_logps"):
            t = getattr(batch, name)
            if t is not None:
                setattr(batch, name, t.to(self.device))
        return batch


TORCH = Backend("torch", "torch", torch.float64)
TORCH_NOCSRC = Backend("torch-nocsrc", "torch", torch.float64, csrc=False)
TRITON = Backend("triton", "triton", torch.float32, device=DEVICE)
REFERENCE = Backend("reference", "reference", torch.float64)
BACKENDS = [TORCH, TORCH_NOCSRC, TRITON, REFERENCE]


def cases(table: dict[Backend, list]) -> list:
    """``pytest.param(backend, case)`` for each backend's cases, ids ``BACKEND-CASE``; a backend that
    cannot run here is skipped with its reason."""
    out = []
    for backend, its_cases in table.items():
        reason = backend.skip_reason
        marks = [pytest.mark.skip(reason=str(reason))] if reason else []
        out += [pytest.param(backend, c, id=f"{backend.id}-{c.id}", marks=marks) for c in its_cases]
    return out
