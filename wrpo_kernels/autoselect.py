"""Which backend runs: the backends, what each answers, and what ``backend="auto"`` picks.

Every backend answers the three calls of :class:`Backend` on validated, packed inputs: ``"torch"``
(chunked PyTorch, runs anywhere), ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"reference"`` (the naive oracle, ``reference.ReferenceBackend``).

``"auto"`` runs the Triton kernels on a CUDA device once they pass a self-test there: the first
``auto`` call per (device, dtype) runs a small fused loss (fwd + bwd) and a forward-only log-prob
with both backends and compares them. Triton wins if it compiles and agrees; otherwise ``auto`` uses
the torch backend and warns once, naming the reason. An explicitly named backend never falls back:
it raises if it cannot run.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Protocol, runtime_checkable

import torch

from . import reference, torch_backend
from .chunked.options import HeadOptions
from .head_inputs import HeadInputs
from .objective import PreferenceSpec, make_spec
from .output import FusedLoss
from .packing import PackedRows, sequence_ids
from .totals import OWN_COUNTS, Totals

BACKENDS = ("auto", "torch", "triton", "reference")
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
_verdicts: dict[tuple[str, torch.dtype], str | None] = {}


@runtime_checkable
class Backend(Protocol):
    """The calls every backend answers. ``x``: the validated head inputs (:class:`HeadInputs`: packed
    hidden, labels, layout, weight, bias, options), rows with ignored labels included; the rest is
    keyword-only. ``chunk_tokens``: rows of logits per chunk (None: the backend's default)."""

    def linear_logprobs(self, x: HeadInputs, *, reduction: str, chunk_tokens: int | None) -> torch.Tensor:
        """Log-probs [S] ("sum", "mean") or [N] ("none"), differentiable w.r.t. hidden, weight, bias."""

    def fused_linear_wrpo_loss(
        self,
        x: HeadInputs,
        *,
        spec: PreferenceSpec,
        ref_logps: torch.Tensor | None,
        nll_weight: float,
        totals: Totals,
        chunk_tokens: int | None,
    ) -> FusedLoss:
        """:class:`FusedLoss` (loss; policy log-probs [B, K] and this call's mean NLL, detached);
        ``totals``: the denominators of the two means (0-dim tensors in the math dtype; None: the call's
        own)."""

    def fused_linear_nll_loss(
        self, x: HeadInputs, *, totals: Totals, chunk_tokens: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL over the labelled rows, log-probs [S] detached); ``totals.tokens``: the denominator."""

    def wrpo_loss(self, spec: PreferenceSpec, logps, ref_logps, lengths):
        """The loss from [B, K] log-probs, in their dtype, differentiable w.r.t. ``logps``."""


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` here, or None if it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    )


def backend(name: str) -> Backend:
    """The implementation of a named backend (``triton`` is imported on first use)."""
    if name == "torch":
        return torch_backend
    if name == "triton":
        return importlib.import_module(".triton_backend", __package__)
    if name == "reference":
        return reference.BACKEND
    raise ValueError(f"backend={name!r} is not available; choose one of {BACKENDS}")


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[str, Backend]:
    """-> (name, implementation). ``auto``: :func:`auto_backend`. A named backend that cannot run on
    ``device`` raises (no silent fallback)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not available; choose one of {BACKENDS}")
    if name == "auto":
        name = auto_backend(device, dtype)
    if name == "triton" and (reason := triton_unavailable_reason(device)):
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    return name, backend(name)


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` on CUDA devices where the kernels pass :func:`triton_self_test`, else ``"torch"``."""
    if device.type != "cuda" or dtype not in _TOLERANCE:
        return "torch"
    key = (str(device), dtype)
    if key not in _verdicts:
        _verdicts[key] = triton_self_test(device, dtype)
        if _verdicts[key] is not None:
            warnings.warn(
                f"wrpo_kernels: backend='auto' runs the torch backend on {device} ({dtype}): the Triton "
                f"kernels failed their self-test: {_verdicts[key]}",
                RuntimeWarning,
                stacklevel=3,
            )
    return "torch" if _verdicts[key] else "triton"


def _self_test_batch(device, dtype):
    """(head inputs, ref_logps [2, 3]): 2 groups of K = 3 with one ignored label; V and H multiples of
    nothing."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 2, 6, 4]
    N, H, V = sum(lengths), 40, 509
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[0] = -100
    cu_host = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(cu_host, device=device)
    seq = sequence_ids(cu, N)
    counts = torch.zeros(len(lengths), dtype=torch.int64, device=device).index_add_(
        0, seq, (labels != -100).long()
    )
    rows = PackedRows(cu, cu_host, seq, counts, counts.tolist())
    ref = torch.randn(2, 3, generator=g).to(device) - 40.0
    return HeadInputs(hidden, weight, None, labels, rows, HeadOptions()), ref


def triton_self_test(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the Triton backend matches the torch backend on a small odd-shaped case; else why not."""
    if reason := triton_unavailable_reason(device):
        return reason
    x, ref = _self_test_batch(device, dtype)
    spec = make_spec(responses_per_prompt=3, num_chosen=2, beta=0.5)
    loss_terms = {"spec": spec, "ref_logps": ref.to(torch.float32), "nll_weight": 0.0, "totals": OWN_COUNTS}
    results = {}
    try:
        for name in ("torch", "triton"):
            impl = backend(name)
            # the caller may be under no_grad / inference_mode / autocast: the test needs plain autograd
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                h, w = x.hidden.clone().requires_grad_(), x.weight.clone().requires_grad_()
                leaves = x._replace(hidden=h, weight=w)
                loss = impl.fused_linear_wrpo_loss(leaves, chunk_tokens=None, **loss_terms).loss
                loss.backward()
                with torch.no_grad():
                    logps = impl.linear_logprobs(x, reduction="sum", chunk_tokens=None)
            results[name] = {"loss": loss.detach(), "dX": h.grad, "dW": w.grad, "logps": logps}
    except Exception as err:  # a compile or launch failure on this device: report it, do not crash auto
        return f"{type(err).__name__}: {err}"
    tol = _TOLERANCE[dtype]
    for name, want in results["torch"].items():
        got = results["triton"][name]
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
        if not err <= tol:
            return f"{name} differs from the torch backend by {err:.2e} relative (tolerance {tol:g})"
    return None
