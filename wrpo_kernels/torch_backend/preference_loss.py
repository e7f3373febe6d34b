"""``wrpo_loss`` from [B, K] log-probs: the analytic gradient of DESIGN §2 in an autograd function."""

from __future__ import annotations

import torch

from ..objective import PreferenceSpec, group_loss_and_grad
from ..once_differentiable import once_differentiable


class PreferenceLossFunction(torch.autograd.Function):
    """logps [B, K], ref_logps [B, K] | None, lengths [B, K] | None -> mean group loss (0-dim).

    ``group_loss(spec, logps, ref, lengths) -> (loss [B], dL/dlogps [B, K])`` does the work
    (torch ops by default; the Triton backend passes its kernel).

    First-order only: the saved dL/dlogps is a constant to autograd, so a second derivative taken
    through ``backward`` would miss d2L/dlogps2 (which depends on logps); ``once_differentiable``
    makes such an attempt raise instead of returning a wrong value.
    """

    @staticmethod
    def forward(ctx, logps, ref_logps, lengths, spec: PreferenceSpec, group_loss=group_loss_and_grad):
        losses, dloss_dlogps = group_loss(spec, logps, ref_logps, lengths)
        ctx.save_for_backward(dloss_dlogps.to(logps.dtype) / logps.shape[0])
        return losses.to(logps.dtype).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad = grad * grad_loss
        dref = -grad if ctx.needs_input_grad[1] else None
        return grad, dref, None, None, None
