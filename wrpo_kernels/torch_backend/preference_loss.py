"""``wrpo_loss`` from [B, K] log-probs on the torch backend: the analytic gradient of DESIGN §2."""

from __future__ import annotations

import torch

from ..objective import PreferenceSpec, group_loss_and_grad


class PreferenceLossFunction(torch.autograd.Function):
    """logps [B, K], ref_logps [B, K] | None, lengths [B, K] | None -> mean group loss (0-dim)."""

    @staticmethod
    def forward(ctx, logps, ref_logps, lengths, spec: PreferenceSpec):
        losses, dloss_dlogps = group_loss_and_grad(spec, logps, ref_logps, lengths)
        ctx.save_for_backward(dloss_dlogps / logps.shape[0])
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad = grad * grad_loss
        dref = -grad if ctx.needs_input_grad[1] else None
        return grad, dref, None, None
