"""Single-pass fused LM head + mean NLL over row tiles (SFT), any row ops.

loss = -(1 / n) * sum_t log p_t over the labelled rows, n = ``totals.tokens`` (default: their count).
dL/d(log p_t) = -1/n does not depend on the log-probs, so each tile's logits are turned into
dL/dlogits right after its lse and target: logits once, gradients in the forward (6NHV), where
``linear_logprobs`` + autograd recomputes them in the backward (8NHV). Any tile size works: the
loss does not couple rows. ``backward`` only scales the stored gradients by grad_output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective import math_dtype
from ..once_differentiable import once_differentiable
from ..packing import segment_sum
from ..totals import OWN_COUNTS, Totals
from .grads import HeadGrads, save_grads, saved_grads
from .options import HeadOptions
from .row_ops import RowOps
from .schedule import row_tiles
from .targets import Targets


@dataclass(frozen=True)
class NLLPlan:
    targets: Targets
    opts: HeadOptions
    chunk_tokens: int
    ops: RowOps
    totals: Totals = OWN_COUNTS  # tokens: the mean's denominator, 0-dim (None: this call's labelled rows)


def fused_nll_forward(hidden, weight, bias, plan: NLLPlan, needs):
    """Returns the loss (0-dim), per-sequence log-prob sums [S] and the gradients (:class:`HeadGrads`)."""
    t, opts, ops = plan.targets, plan.opts, plan.ops
    N, V = hidden.shape[0], weight.shape[0]
    md = math_dtype(hidden.dtype)
    want_grad = any(needs)
    tokens = t.valid.sum() if plan.totals.tokens is None else plan.totals.tokens
    scale = t.valid * (-1.0 / tokens)  # dL/d(log p_t)
    tok = torch.zeros(N, dtype=md, device=hidden.device)
    grads = HeadGrads(hidden, weight, needs)
    if N:
        softcap_grad = opts.softcap is not None and want_grad
        ws = ops.workspace(
            min(N, plan.chunk_tokens), V, hidden.dtype, hidden.device, softcap_grad=softcap_grad
        )
    for a, b in row_tiles(0, N, plan.chunk_tokens):
        st = ops.logits(ws, hidden[a:b], weight, bias, opts, for_grad=want_grad)
        lse, target = ops.stats(st, t.safe[a:b], opts)
        torch.mul(target - lse, t.valid[a:b], out=tok[a:b])
        if want_grad:
            g = ops.grad(st, t.safe[a:b], scale[a:b], lse, opts)
            grads.add_rows_(g, a, b, hidden, weight, ops.lowp(ws, b - a))
    return -tok.sum() / tokens, segment_sum(tok, t.seq, t.counts.numel()), grads


class FusedLinearNLLFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None -> (loss, logps [S] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: NLLPlan, needs):
        loss, logps, grads = fused_nll_forward(hidden, weight, bias, plan, needs)
        save_grads(ctx, grads, weight, bias)
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logps):
        return *saved_grads(ctx, grad_loss, "fused_linear_nll_loss"), None, None
