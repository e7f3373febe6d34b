"""Single-pass fused LM head + WRPO loss over chunks of whole groups (docs/method.md §4), any row ops.

Per chunk of whole groups: logits once (GEMM) -> lse and target -> per-sequence log-probs s ->
group loss and dL/ds -> logits turned in place into dL/dlogits -> dX for the chunk, dW and db
accumulated in fp32. Work 6NHV; a group larger than the budget costs 8NHV (two passes over tiles).
``logp_reduction="mean"`` weighs each token by 1/n of its sequence, in the per-sequence log-probs
and in their gradient alike (:func:`token_weights`): the same single pass.
``backward`` only scales the stored gradients by grad_output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective import PreferenceSpec, math_dtype, token_span
from ..once_differentiable import once_differentiable
from ..output import FusedLoss
from ..totals import OWN_COUNTS, Totals
from .grads import HeadGrads, save_grads, saved_grads
from .logprobs import recompute_head_grads_
from .options import HeadOptions
from .row_ops import RowOps
from .schedule import GroupChunk
from .targets import Targets


@dataclass(frozen=True)
class FusedPlan:
    spec: PreferenceSpec
    targets: Targets
    opts: HeadOptions
    chunks: tuple[GroupChunk, ...]
    chunk_tokens: int
    nll_weight: float
    ops: RowOps
    totals: Totals = OWN_COUNTS  # 0-dim tensors; None: B groups, this batch's first-chosen tokens


def token_weights(spec: PreferenceSpec, t: Targets) -> torch.Tensor:
    """ds/d(log p_t) [N] in the math dtype: 1 ("sum") or 1/n of the token's sequence ("mean"); 0 if ignored.

    s_k = sum_t weight_t log p_t over sequence k's tokens, and dL/d(log p_t) = dL/ds_k * weight_t.
    """
    if not spec.logps_are_means:
        return t.valid
    return t.valid / t.counts.to(t.valid.dtype)[t.seq]


def fused_forward(hidden, weight, bias, ref_logps, plan: FusedPlan, needs):
    """-> (:class:`FusedLoss`: the loss, policy log-probs [B, K], this call's mean NLL; the gradients)."""
    spec, t, opts = plan.spec, plan.targets, plan.opts
    K = spec.responses_per_prompt
    S = t.counts.numel()
    B = S // K
    md = math_dtype(hidden.dtype)
    dev = hidden.device
    want_grad = any(needs)
    lengths = t.counts.view(B, K).to(md)
    weights = token_weights(spec, t)
    groups = B if plan.totals.groups is None else plan.totals.groups
    # the NLL term, -nll_weight / (tokens of all first-chosen responses) * their summed log-probs:
    # dL/ds_0 = -nll_coef * span (a mean s stands for span = n tokens), whatever logp_reduction is.
    nll_tokens = lengths[:, 0].sum() if plan.totals.tokens is None else plan.totals.tokens
    nll_coef = plan.nll_weight / nll_tokens
    span = token_span(spec, lengths)[:, 0]

    logps = torch.empty(S, dtype=md, device=dev)
    tok = torch.empty(hidden.shape[0], dtype=md, device=dev)
    group_losses = torch.empty(B, dtype=md, device=dev)
    grads = HeadGrads(hidden, weight, needs)
    ops = plan.ops
    rows = max(b - a for c in plan.chunks for a, b in c.tiles)
    softcap_grad = opts.softcap is not None and want_grad
    ws = ops.workspace(rows, weight.shape[0], hidden.dtype, dev, softcap_grad=softcap_grad)

    for c in plan.chunks:
        lse = torch.empty(c.t1 - c.t0, dtype=md, device=dev)
        for a, b in c.tiles:
            st = ops.logits(ws, hidden[a:b], weight, bias, opts, for_grad=want_grad and c.single_pass)
            lse[a - c.t0 : b - c.t0], target = ops.stats(st, t.safe[a:b], opts)
            torch.mul(target - lse[a - c.t0 : b - c.t0], weights[a:b], out=tok[a:b])
        s, loss_g, ds = ops.group_loss(spec, tok, t, c, ref_logps, lengths)
        logps[c.g0 * K : c.g1 * K] = s
        group_losses[c.g0 : c.g1] = loss_g
        if not want_grad:
            continue
        ds = ds / groups
        ds[:, 0] -= nll_coef * span[c.g0 : c.g1]
        scale = ds.reshape(-1)[t.seq[c.t0 : c.t1] - c.g0 * K] * weights[c.t0 : c.t1]
        if c.single_pass:
            g = ops.grad(st, t.safe[c.t0 : c.t1], scale, lse, opts)
            grads.add_rows_(g, c.t0, c.t1, hidden, weight, ops.lowp(ws, c.t1 - c.t0))
        else:  # the group outgrew the budget: recompute its logits tile by tile
            recompute_head_grads_(
                ops, ws, grads, hidden, weight, bias, t.safe, opts, lse, scale, c.tiles, c.t0
            )

    loss = group_losses.mean() if plan.totals.groups is None else group_losses.sum() / groups
    first_chosen = (logps.view(B, K)[:, 0] * span).sum()  # their summed log-probs
    if plan.nll_weight:
        loss = loss - nll_coef * first_chosen
    return FusedLoss(loss, logps.view(B, K), -first_chosen / lengths[:, 0].sum()), grads


class FusedLinearWRPOFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None -> (loss, logps [B, K], nll): :class:`FusedLoss`,
    only the loss differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_logps, plan: FusedPlan, needs):
        out, grads = fused_forward(hidden, weight, bias, ref_logps, plan, needs)
        save_grads(ctx, grads, weight, bias)
        ctx.mark_non_differentiable(out.logps, out.nll)
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logps, _grad_nll):
        return *saved_grads(ctx, grad_loss, "fused_linear_wrpo_loss"), None, None, None
