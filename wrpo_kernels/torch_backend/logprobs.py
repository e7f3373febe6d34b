"""Two-pass ``linear_logprobs`` on the chunked torch backend (DESIGN §4, "Two pass").

Forward keeps only lse per token (O(N)); backward recomputes each chunk's logits and turns them
into dL/dlogits in place before the two gradient GEMMs. Memory: one chunk of logits + gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import segment_sum
from .rows import (
    HeadGrads,
    HeadOptions,
    Targets,
    Workspace,
    head_logits_,
    math_dtype,
    softmax_grad_,
    softmax_stats_,
)
from .schedule import row_tiles


@dataclass(frozen=True)
class LogprobPlan:
    targets: Targets
    opts: HeadOptions
    reduction: str
    chunk_tokens: int


def token_logprobs_and_lse(hidden, weight, bias, plan: LogprobPlan):
    """log p [N] (0 where ignored) and lse [N], chunk by chunk, nothing of size N x V kept."""
    N, V = hidden.shape[0], weight.shape[0]
    md = math_dtype(hidden.dtype)
    tok = torch.empty(N, dtype=md, device=hidden.device)
    lse = torch.empty(N, dtype=md, device=hidden.device)
    tiles = row_tiles(0, N, plan.chunk_tokens)
    ws = Workspace(min(N, plan.chunk_tokens), V, hidden.dtype, hidden.device, softcap=False)
    t = plan.targets
    for a, b in tiles:
        z, _ = head_logits_(ws, hidden[a:b], weight, bias, plan.opts, keep_capgrad=False)
        lse[a:b], target, _ = softmax_stats_(z, t.safe[a:b])
        torch.mul(target - lse[a:b], t.valid[a:b], out=tok[a:b])
    return tok, lse


def recompute_head_grads_(
    ws, grads: HeadGrads, hidden, weight, bias, safe, opts, lse, scale, tiles, offset=0
):
    """Add the gradients of sum_t scale_t * log p_t over ``tiles`` of rows to ``grads``.

    Logits are recomputed tile by tile and turned in place into dL/dlogits with the stored lse.
    Tiles and ``safe`` index rows of ``hidden``; ``lse`` and ``scale`` start at row ``offset``.
    """
    for a, b in tiles:
        z, cap = head_logits_(ws, hidden[a:b], weight, bias, opts, keep_capgrad=True)
        softmax_grad_(
            z, safe[a:b], scale[a - offset : b - offset], lse=lse[a - offset : b - offset], capgrad=cap
        )
        grads.add_rows_(ws, z, a, b, hidden, weight)


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None -> log-probs [S] ("sum"/"mean") or [N] ("none")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: LogprobPlan):
        tok, lse = token_logprobs_and_lse(hidden, weight, bias, plan)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.plan = plan
        if plan.reduction == "none":
            return tok
        sums = segment_sum(tok, plan.targets.seq, plan.targets.counts.numel())
        return sums if plan.reduction == "sum" else sums / plan.targets.counts

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, lse = ctx.saved_tensors
        plan: LogprobPlan = ctx.plan
        t = plan.targets
        g = grad_out.contiguous().to(lse.dtype)
        if plan.reduction == "mean":
            g = g / t.counts
        per_token = g if plan.reduction == "none" else g[t.seq]
        scale = per_token * t.valid / plan.opts.temperature
        N, V = hidden.shape[0], weight.shape[0]
        grads = HeadGrads(hidden, weight, ctx.needs_input_grad[:3])
        ws = Workspace(
            min(N, plan.chunk_tokens), V, hidden.dtype, hidden.device, softcap=plan.opts.softcap is not None
        )
        tiles = row_tiles(0, N, plan.chunk_tokens)
        recompute_head_grads_(ws, grads, hidden, weight, bias, t.safe, plan.opts, lse, scale, tiles)
        return (
            grads.dX,
            None if grads.dW is None else grads.dW.to(weight.dtype),
            None if grads.db is None else grads.db.to(bias.dtype),
            None,
        )
