"""Two-pass ``linear_logprobs`` over chunks of rows (docs/method.md §4), for any row-ops backend.

Forward keeps only lse per token (O(N)); backward recomputes each chunk's logits and turns them
into dL/dlogits in place before the two gradient GEMMs. Memory: one chunk of logits + gradients.
``ops`` does the row work (torch element-wise ops, or Triton kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective import math_dtype
from ..once_differentiable import once_differentiable
from ..packing import segment_sum
from .grads import HeadGrads
from .options import HeadOptions
from .row_ops import RowOps
from .schedule import row_tiles
from .targets import Targets


@dataclass(frozen=True)
class LogprobPlan:
    targets: Targets
    opts: HeadOptions
    reduction: str
    chunk_tokens: int
    ops: RowOps


def token_logprobs_and_lse(hidden, weight, bias, plan: LogprobPlan):
    """log p [N] (0 where ignored) and lse [N], chunk by chunk, nothing of size N x V kept."""
    N, V = hidden.shape[0], weight.shape[0]
    md = math_dtype(hidden.dtype)
    tok = torch.empty(N, dtype=md, device=hidden.device)
    lse = torch.empty(N, dtype=md, device=hidden.device)
    ops, t = plan.ops, plan.targets
    ws = ops.workspace(min(N, plan.chunk_tokens), V, hidden.dtype, hidden.device, softcap_grad=False)
    for a, b in row_tiles(0, N, plan.chunk_tokens):
        st = ops.logits(ws, hidden[a:b], weight, bias, plan.opts, for_grad=False)
        lse[a:b], target = ops.stats(st, t.safe[a:b], plan.opts)
        torch.mul(target - lse[a:b], t.valid[a:b], out=tok[a:b])
    return tok, lse


def recompute_head_grads_(
    ops: RowOps, ws, grads: HeadGrads, hidden, weight, bias, safe, opts, lse, scale, tiles, offset=0
):
    """Add the gradients of sum_t scale_t * log p_t over ``tiles`` of rows to ``grads``.

    Logits are recomputed tile by tile and turned in place into dL/dlogits with the stored lse.
    Tiles and ``safe`` index rows of ``hidden``; ``lse`` and ``scale`` start at row ``offset``.
    """
    for a, b in tiles:
        st = ops.logits(ws, hidden[a:b], weight, bias, opts, for_grad=True)
        g = ops.grad(st, safe[a:b], scale[a - offset : b - offset], lse[a - offset : b - offset], opts)
        grads.add_rows_(g, a, b, hidden, weight, ops.lowp(ws, b - a))


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None -> log-probs [S] ("sum"/"mean") or [N] ("none")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: LogprobPlan):
        tok, lse = token_logprobs_and_lse(hidden, weight, bias, plan)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.plan = plan
        return reduce_token_logprobs(tok, plan.targets, plan.reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, lse = ctx.saved_tensors
        plan: LogprobPlan = ctx.plan
        t = plan.targets
        g = grad_out.contiguous().to(lse.dtype)
        if plan.reduction == "mean":
            g = g / t.counts
        scale = (g if plan.reduction == "none" else g[t.seq]) * t.valid
        N, V = hidden.shape[0], weight.shape[0]
        grads = HeadGrads(hidden, weight, ctx.needs_input_grad[:3])
        softcap_grad = plan.opts.softcap is not None
        ws = plan.ops.workspace(
            min(N, plan.chunk_tokens), V, hidden.dtype, hidden.device, softcap_grad=softcap_grad
        )
        tiles = row_tiles(0, N, plan.chunk_tokens)
        recompute_head_grads_(plan.ops, ws, grads, hidden, weight, bias, t.safe, plan.opts, lse, scale, tiles)
        return (*grads.to_input_dtypes(weight.dtype, None if bias is None else bias.dtype), None)


def reduce_token_logprobs(tok, targets: Targets, reduction: str):
    """Per-token log-probs [N] -> [N] ("none"), per-sequence sums [S] ("sum") or means [S] ("mean")."""
    if reduction == "none":
        return tok
    sums = segment_sum(tok, targets.seq, targets.counts.numel())
    return sums if reduction == "sum" else sums / targets.counts
