"""Gradients of the head, accumulated chunk by chunk (docs/method.md §4: dW in fp32)."""

from __future__ import annotations

import functools

import torch

from ..objective import math_dtype


def _has_fp32_out_gemm() -> bool:
    """torch >= 2.8 multiplies fp16/bf16 matrices into an fp32 result: ``mm``/``addmm(..., out_dtype=)``."""
    try:
        return torch.ops.aten.mm.dtype_out is not None and torch.ops.aten.addmm.dtype_out is not None
    except AttributeError:
        return False


HAS_FP32_OUT_GEMM = _has_fp32_out_gemm()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp32_out_gemm(device: torch.device) -> bool:
    """Whether 16-bit products go straight into an fp32 dW on ``device``: CUDA (cuBLAS, compute
    capability 8.0 or newer, as Liger gates the same call) with a torch that has ``out_dtype``. The
    CPU kernels of ``addmm``/``mm`` have no ``out_dtype`` (torch 2.13 included)."""
    if not HAS_FP32_OUT_GEMM or device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)


def add_product_(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, overwrite: bool, a_wide=None
) -> None:
    """acc [M, K] (fp32/fp64) += a @ b (or = a @ b with ``overwrite``: acc is not read), with no
    temporary of acc's size: the products are formed and summed in acc's dtype.

    ``a``, ``b`` in acc's dtype: one GEMM in place. 16-bit ``a``, ``b``: on CUDA with torch >= 2.8 one
    cuBLAS GEMM with 16-bit operands and the fp32 acc as its output (``out_dtype``); elsewhere the
    operands are upcast (``a_wide``, if given, is ``a`` already in acc's dtype) and the GEMM runs in
    fp32: temporaries the size of a and b, slower on a GPU (no tensor cores) but as exact.
    """
    beta = 0.0 if overwrite else 1.0
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif fp32_out_gemm(acc.device):
        if overwrite:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        wide = a_wide if a_wide is not None else a.to(acc.dtype)
        acc.addmm_(wide, b.to(acc.dtype), beta=beta)


class HeadGrads:
    """dX [N, H] (input dtype); dW [V, H] and db [V] accumulated in fp32 (fp64 for fp64); None if unneeded.

    dW and db start uninitialised: the first :meth:`add_rows_` writes them (GEMM with beta = 0), later
    ones add, so no zero fill of a [V, H] buffer is paid per call, and no chunk allocates one either.
    """

    def __init__(self, hidden, weight, needs):
        md = math_dtype(hidden.dtype)
        self.dX = torch.empty_like(hidden) if needs[0] else None
        self.dW = torch.empty(weight.shape, dtype=md, device=weight.device) if needs[1] else None
        self.db = torch.empty(weight.shape[0], dtype=md, device=weight.device) if needs[2] else None
        self._written = False

    def add_rows_(self, dlogits, a: int, b: int, hidden, weight, lowp=None):
        """Rows [a, b): dX = dlogits @ W; dW += dlogits^T @ hidden; db += sum of the rows of dlogits.

        ``dlogits`` may be in the math dtype (then ``lowp``, a buffer in the input dtype, receives a
        copy for the GEMMs) or already in the input dtype. Each chunk's dW product is formed in fp32,
        not rounded to bf16 before the sum (:func:`add_product_`).
        """
        first = not self._written  # the uninitialised buffers are written, not read
        self._written = True
        g = dlogits
        if g.dtype != hidden.dtype:
            g = lowp.copy_(dlogits)
        if self.dX is not None:
            torch.mm(g, weight, out=self.dX[a:b])
        if self.dW is not None:
            wide = dlogits.t() if dlogits.dtype == self.dW.dtype else None
            add_product_(self.dW, g.t(), hidden[a:b], overwrite=first, a_wide=wide)
        if self.db is not None:
            part = dlogits.sum(0, dtype=self.db.dtype)
            if first:
                self.db.copy_(part)
            else:
                self.db.add_(part)

    def scale_(self, grad_output: torch.Tensor) -> None:
        """Multiply the gradients by dL/d(output); skipped for a CPU 1.0 (``loss.backward()``)."""
        self._zero_if_unwritten()
        if grad_output.device.type == "cpu" and grad_output.numel() == 1 and grad_output.item() == 1.0:
            return
        for g in (self.dX, self.dW, self.db):
            if g is not None:
                g.mul_(grad_output)

    def _zero_if_unwritten(self):
        """No row reached the head (an empty batch): the gradients are zero."""
        if not self._written:
            for g in (self.dW, self.db):
                if g is not None:
                    g.zero_()
            self._written = True

    def to_input_dtypes(self, weight_dtype, bias_dtype):
        """(dX, dW, db) with dW and db cast back to the parameters' dtypes."""
        self._zero_if_unwritten()
        dW = None if self.dW is None else self.dW.to(weight_dtype)
        db = None if self.db is None else self.db.to(bias_dtype)
        return self.dX, dW, db


def save_grads(ctx, grads: HeadGrads, weight, bias) -> None:
    """Keep the gradients a forward computed for its backward (:func:`saved_grads`, consumed once)."""
    ctx.grads, ctx.dtypes = grads, (weight.dtype, None if bias is None else bias.dtype)


def saved_grads(ctx, grad_loss, name: str):
    """(dX, dW, db) kept by :func:`save_grads`, scaled by dL/d(loss), in the parameters' dtypes;
    RuntimeError naming ``name`` when a second backward asks for them again."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(f"{name}: backward ran twice; its gradients are consumed once")
    ctx.grads = None
    grads.scale_(grad_loss)
    return grads.to_input_dtypes(*ctx.dtypes)
