"""Single-pass fused LM head + WRPO loss on the chunked torch backend (DESIGN §4, "Single pass").

Per chunk of whole groups: logits once (GEMM) -> lse and target -> per-sequence log-probs s ->
group loss and dL/ds -> logits turned in place into dL/dlogits -> dX for the chunk, dW and db
accumulated in fp32. Work 6NHV; a group larger than the budget costs 8NHV (two passes over tiles).
``backward`` only scales the stored gradients by grad_output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective import PreferenceSpec, group_loss_and_grad
from ..packing import segment_sum
from .logprobs import recompute_head_grads_
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
from .schedule import GroupChunk


@dataclass(frozen=True)
class FusedPlan:
    spec: PreferenceSpec
    targets: Targets
    opts: HeadOptions
    chunks: tuple[GroupChunk, ...]
    chunk_tokens: int
    nll_weight: float


def fused_forward(hidden, weight, bias, ref_logps, plan: FusedPlan, needs):
    """Returns the loss (0-dim), policy log-probs [B, K] and the gradients (:class:`HeadGrads`)."""
    spec, t, opts = plan.spec, plan.targets, plan.opts
    K = spec.responses_per_prompt
    S = t.counts.numel()
    B = S // K
    md = math_dtype(hidden.dtype)
    dev = hidden.device
    want_grad = any(needs)
    lengths = t.counts.view(B, K).to(md)
    # dL/ds of the NLL term: -nll_weight / (tokens of all first-chosen responses), on response 0.
    nll_coef = plan.nll_weight / lengths[:, 0].sum()

    logps = torch.empty(S, dtype=md, device=dev)
    tok = torch.empty(hidden.shape[0], dtype=md, device=dev)
    group_losses = torch.empty(B, dtype=md, device=dev)
    grads = HeadGrads(hidden, weight, needs)
    rows = max(b - a for c in plan.chunks for a, b in c.tiles)
    ws = Workspace(rows, weight.shape[0], hidden.dtype, dev, softcap=opts.softcap is not None and want_grad)

    for c in plan.chunks:
        s0, s1 = c.g0 * K, c.g1 * K
        local_seq = t.seq[c.t0 : c.t1] - s0
        lse = torch.empty(c.t1 - c.t0, dtype=md, device=dev)
        for a, b in c.tiles:
            z, cap = head_logits_(
                ws, hidden[a:b], weight, bias, opts, keep_capgrad=want_grad and c.single_pass
            )
            lse[a - c.t0 : b - c.t0], target, sumexp = softmax_stats_(z, t.safe[a:b])
            torch.mul(target - lse[a - c.t0 : b - c.t0], t.valid[a:b], out=tok[a:b])
        s = segment_sum(tok[c.t0 : c.t1], local_seq, s1 - s0)
        logps[s0:s1] = s
        ref = None if ref_logps is None else ref_logps[c.g0 : c.g1]
        loss_g, ds = group_loss_and_grad(spec, s.view(-1, K), ref, lengths[c.g0 : c.g1])
        group_losses[c.g0 : c.g1] = loss_g
        if not want_grad:
            continue
        ds = ds / B
        ds[:, 0] -= nll_coef
        scale = ds.reshape(-1)[local_seq] * t.valid[c.t0 : c.t1] / opts.temperature
        if c.single_pass:
            softmax_grad_(z, t.safe[c.t0 : c.t1], scale, sumexp=sumexp, capgrad=cap)
            grads.add_rows_(ws, z, c.t0, c.t1, hidden, weight)
        else:  # the group outgrew the budget: recompute its logits tile by tile
            recompute_head_grads_(ws, grads, hidden, weight, bias, t.safe, opts, lse, scale, c.tiles, c.t0)

    loss = group_losses.mean()
    if plan.nll_weight:
        loss = loss - nll_coef * logps.view(B, K)[:, 0].sum()
    return loss, logps.view(B, K), grads


class FusedLinearWRPOFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None -> (loss, logps [B, K] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_logps, plan: FusedPlan, needs):
        loss, logps, grads = fused_forward(hidden, weight, bias, ref_logps, plan, needs)
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("fused_linear_wrpo_loss: backward ran twice; its gradients are consumed once")
        ctx.grads = None
        dX = None if grads.dX is None else grads.dX.mul_(grad_loss)
        dW = None if grads.dW is None else grads.dW.mul_(grad_loss).to(ctx.dtypes[0])
        db = None if grads.db is None else grads.db.mul_(grad_loss).to(ctx.dtypes[1])
        return dX, dW, db, None, None, None
