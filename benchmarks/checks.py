"""The head-loss benchmark's correctness check: each method's loss, dL/dhidden and dL/dweight against
a reference on the same inputs, as relative Frobenius errors, graded against the dtype's tolerance.

The reference is the naive path in fp64 on small shapes, and the torch backend in fp32 on large ones
(where fp64 logits would not fit or take too long). A method passes if every error is within the
dtype's tolerance or twice the naive path's error in the same dtype: in bf16 the naive path itself is
that far off, and a fused method should not be held to a tighter bar than it.
"""

from __future__ import annotations

import torch

import wrpo_kernels as wk

CHECK_TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
FP64_MAX_LOGITS = 2**24  # N V up to this: the fp64 naive reference, else the fp32 torch backend


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in the expected tensor's dtype (fp32 or fp64)."""
    if actual is None:
        return float("inf")
    e = expected.detach()
    a = actual.detach().to(e.dtype)
    diff, scale = (a - e).norm().item(), e.norm().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def check_reference(inputs, with_ref: bool, num_chosen: int, alpha: float, beta: float) -> dict:
    """Loss and gradients on the same (rounded) inputs; ``with_ref``: use the reference log-probs
    (else zeros, what liger-dpo/k2's use_ref_model=False computes). -> {loss, dX, dW, name}."""
    hidden, weight, labels, cu, ref = inputs
    K = ref.shape[1]
    small = hidden.shape[0] * weight.shape[0] <= FP64_MAX_LOGITS
    dtype, backend = (torch.float64, "reference") if small else (torch.float32, "torch")
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    out = wk.fused_linear_wrpo_loss(
        h,
        w,
        labels,
        cu,
        responses_per_prompt=K,
        num_chosen=num_chosen,
        alpha=alpha,
        ref_logps=ref if with_ref else torch.zeros_like(ref),
        beta=beta,
        backend=backend,
    )
    out.loss.backward()
    name = "fp64 naive" if small else "fp32 torch backend"
    if not with_ref:
        name += ", no reference log-probs"
    return {"loss": out.loss.detach(), "dX": h.grad, "dW": w.grad, "name": name}


def check_errors(loss, grads, expect: dict) -> dict:
    """{loss, dX, dW}: relative errors of a method's loss and (dX, dW) against ``expect``."""
    dX, dW = grads
    return {
        "loss": rel_err(loss, expect["loss"]),
        "dX": rel_err(dX, expect["dX"]),
        "dW": rel_err(dW, expect["dW"]),
    }


def grade_checks(results: list[dict], dtype: str, own_bar: tuple[str, ...] = ()) -> None:
    """Set each result's ``check["tolerance"]`` and ``check["ok"]``: every error within the dtype's
    tolerance or twice that of its ``baseline`` (the naive method on the same tokens). The methods of
    ``own_bar`` (another loss) and the baselines themselves get the dtype's tolerance alone."""
    tol = CHECK_TOL[dtype]
    by = {r["method"]: r for r in results}
    for r in results:
        c = r.get("check")
        if not c:
            continue
        alone = r["method"] in (*own_bar, r["baseline"])
        naive = None if alone else by.get(r["baseline"], {}).get("check")
        bars = {k: max(tol, 2 * naive[k]) if naive else tol for k in ("loss", "dX", "dW")}
        c["tolerance"] = bars
        c["ok"] = all(c[k] <= bars[k] for k in bars)


def fmt_check(c) -> str:
    """The three errors of a check in one short line ("-" if none)."""
    if not c:
        return "-"
    return f"loss {c['loss']:.1e} dX {c['dX']:.1e} dW {c['dW']:.1e}"
