"""What ``backend="auto"`` runs: the Triton kernels on a CUDA device once they pass a self-test there.

The first ``auto`` call per (device, dtype) runs a small fused loss (fwd + bwd) and a forward-only
log-prob with both backends and compares them. Triton wins if it compiles and agrees; otherwise
``auto`` uses the torch backend and warns once, naming the reason. ``backend="triton"`` never falls
back: it raises.
"""

from __future__ import annotations

import warnings

import torch

_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
_verdicts: dict[tuple[str, torch.dtype], str | None] = {}


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


def triton_self_test(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the Triton backend matches the torch backend on a small odd-shaped case; else why not."""
    from .api import fused_linear_wrpo_loss, linear_logprobs, triton_unavailable_reason

    if reason := triton_unavailable_reason(device):
        return reason
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 2, 6, 4]  # 2 groups of K = 3, V and H multiples of nothing
    N, H, V = sum(lengths), 40, 509
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[0] = -100
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    ref = torch.randn(2, 3, generator=g).to(device) - 40.0
    results = {}
    try:
        for backend in ("torch", "triton"):
            # the caller may be under no_grad / inference_mode / autocast: the test needs plain autograd
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                out = fused_linear_wrpo_loss(h, w, labels, cu, ref_logps=ref, beta=0.5, backend=backend)
                out.loss.backward()
                with torch.no_grad():
                    logps = linear_logprobs(hidden, weight, labels, cu, backend=backend)
            results[backend] = {"loss": out.loss.detach(), "dX": h.grad, "dW": w.grad, "logps": logps}
    except Exception as err:  # a compile or launch failure on this device: report it, do not crash auto
        return f"{type(err).__name__}: {err}"
    tol = _TOLERANCE[dtype]
    for name, want in results["torch"].items():
        got = results["triton"][name]
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
        if not err <= tol:
            return f"{name} differs from the torch backend by {err:.2e} relative (tolerance {tol:g})"
    return None
