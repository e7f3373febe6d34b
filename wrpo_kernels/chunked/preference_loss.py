"""``wrpo_loss`` from [B, K] log-probs: the analytic gradient of :mod:`wrpo_kernels.objective` in an
autograd function, shared by the torch and Triton backends (which pass their group-loss kernel)."""

from __future__ import annotations

import torch

from ..objective import PreferenceSpec, group_loss_and_grad
from ..once_differentiable import once_differentiable


class PreferenceLossFunction(torch.autograd.Function):
    """logps [B, K], ref_logps [B, K] | None, lengths [B, K] | None -> mean group loss (0-dim).

    ``group_loss(spec, logps, ref, lengths) -> (loss [B], dL/dlogps [B, K])`` does the work
    (torch ops by default; the Triton backend passes its kernel), in fp32 (fp64 for fp64 log-probs).
    The loss is returned in the dtype of ``logps``; the gradients in the dtypes of the inputs.

    First-order only: the saved dL/dlogps is a constant to autograd, so a second derivative taken
    through ``backward`` would miss d2L/dlogps2 (which depends on logps); ``once_differentiable``
    makes such an attempt raise instead of returning a wrong value.
    """

    @staticmethod
    def forward(ctx, logps, ref_logps, lengths, spec: PreferenceSpec, group_loss=group_loss_and_grad):
        losses, dloss_dlogps = group_loss(spec, logps, ref_logps, lengths)
        ctx.save_for_backward(dloss_dlogps / logps.shape[0])
        ctx.dtypes = (logps.dtype, None if ref_logps is None else ref_logps.dtype)
        return losses.mean().to(logps.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad = grad * grad_loss
        logps_dtype, ref_dtype = ctx.dtypes
        dref = (-grad).to(ref_dtype) if ctx.needs_input_grad[1] else None
        return grad.to(logps_dtype), dref, None, None, None
