"""Naive PyTorch: materialises the whole [N, V] logits. The test oracle (in fp64) and the benchmark baseline.

Written the way a user would write it with plain autograd, independently of the analytic gradient
in :mod:`wrpo_kernels.objective`, so that tests of the fast backends check two derivations against
each other. Low-precision logits are upcast to fp32 before the softmax, as TRL and Liger do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .head_inputs import HeadInputs
from .metrics import preference_metrics
from .objective import PreferenceSpec, math_dtype
from .output import FusedLoss, WRPOOutput
from .packing import segment_sum, sequence_ids
from .totals import OWN_COUNTS, Totals


def token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None, temperature=1.0):
    """log softmax(softcap(h W^T + b) / T)[label] per token [N] (fp32 or fp64); 0 where ignored."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    picked = logits.log_softmax(-1).gather(-1, safe[:, None]).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def linear_logprobs(hidden, weight, labels, cu_seqlens, *, reduction="sum", ignore_index=-100, **head):
    """Per-sequence ("sum" | "mean") [S] or per-token ("none") [N] log-probs of packed rows."""
    tok = token_logprobs(hidden, weight, labels, ignore_index=ignore_index, **head)
    if reduction == "none":
        return tok
    S = cu_seqlens.numel() - 1
    seq = sequence_ids(cu_seqlens, labels.numel())
    sums = segment_sum(tok, seq, S)
    if reduction == "sum":
        return sums
    counts = segment_sum((labels != ignore_index).to(sums.dtype), seq, S)
    return sums / counts


def wrpo_loss(spec: PreferenceSpec, logps, ref_logps, lengths, groups=None):
    """(loss, metrics) from [B, K] log-probs, by the formulas of docs/method.md §3, with plain autograd.
    Summed log-probs (``spec.logp_reduction="sum"``) are divided by ``lengths`` for simpo and ipo.

    loss = sum of group losses / ``groups`` (``Totals.groups``; default B: the mean)."""
    C, beta = spec.num_chosen, spec.beta
    md = math_dtype(logps.dtype)  # bf16 log-probs upcast, token counts never rounded to bf16
    s, s_ref = logps.to(md), None if ref_logps is None else ref_logps.to(md)
    n = lengths.to(md) if spec.divides_by_length else 1.0  # simpo, ipo on sums
    if spec.loss_type == "dpo":
        r = beta * (s - s_ref)
    elif spec.loss_type == "simpo":
        r = beta * s / n
    else:
        r = (s - s_ref) / n
    w = torch.tensor(spec.chosen_weights, dtype=r.dtype, device=r.device)
    margin = (r[:, :C] * w).sum(1) - r[:, C:].mean(1) - spec.gamma
    if spec.loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        eps = spec.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    loss = losses.mean() if groups is None else losses.sum() / groups
    return loss, preference_metrics(spec, logps, r)


def fused_linear_wrpo_loss(
    spec: PreferenceSpec,
    hidden,
    weight,
    labels,
    cu_seqlens,
    ref_logps,
    *,
    nll_weight=0.0,
    ignore_index=-100,
    totals: Totals = OWN_COUNTS,
    **head,
) -> WRPOOutput:
    """WRPO loss of packed groups, the naive way: full logits -> log-probs [B, K] -> loss (+ NLL).

    ``spec.logp_reduction="mean"``: the loss sees the sums over the token counts.
    ``totals``: the denominators of the two means (None: this batch's groups and first-chosen tokens).
    ``metrics["nll_loss"]``: the mean NLL over the first-chosen tokens, whatever ``nll_weight`` is."""
    K = spec.responses_per_prompt
    sums = linear_logprobs(hidden, weight, labels, cu_seqlens, ignore_index=ignore_index, **head).view(-1, K)
    seq = sequence_ids(cu_seqlens, labels.numel())
    lengths = segment_sum((labels != ignore_index).to(sums.dtype), seq, sums.numel()).view(-1, K)
    logps = sums / lengths if spec.logps_are_means else sums
    loss, metrics = wrpo_loss(spec, logps, ref_logps, lengths, totals.groups)
    nll_sum = -sums[:, 0].sum()
    nll = nll_sum / lengths[:, 0].sum()
    if nll_weight:
        loss = loss + nll_weight * (nll if totals.tokens is None else nll_sum / totals.tokens)
    metrics["nll_loss"] = nll.detach()
    return WRPOOutput(loss=loss, metrics=metrics, logps=logps.detach())


def _head(x: HeadInputs) -> dict:
    """The keywords of the naive functions above for ``x``'s head (bias and logit options)."""
    opts = x.opts
    if opts.shard is not None:
        raise ValueError(
            "backend='reference' computes the whole head's logits: it takes a whole weight, not one sharded "
            "over the vocabulary (use backend='torch' or 'triton', or pass weight.full_tensor())"
        )
    return {
        "bias": x.bias,
        "ignore_index": opts.ignore_index,
        "softcap": opts.softcap,
        "temperature": opts.temperature,
    }


class ReferenceBackend:
    """``backend="reference"``: the naive functions above behind the calls every backend answers
    (``autoselect.Backend``). It keeps every row, ignored ones included, and materialises their logits."""

    name = "reference"

    @staticmethod
    def linear_logprobs(x: HeadInputs, *, reduction, chunk_tokens):
        return linear_logprobs(x.hidden, x.weight, x.labels, x.rows.cu, reduction=reduction, **_head(x))

    @staticmethod
    def fused_linear_wrpo_loss(x: HeadInputs, *, spec, ref_logps, nll_weight, totals, chunk_tokens):
        out = fused_linear_wrpo_loss(
            spec,
            x.hidden,
            x.weight,
            x.labels,
            x.rows.cu,
            ref_logps,
            nll_weight=nll_weight,
            totals=totals,
            **_head(x),
        )
        return FusedLoss(out.loss, out.logps, out.metrics["nll_loss"])

    @staticmethod
    def fused_linear_nll_loss(x: HeadInputs, *, totals, chunk_tokens):
        logps = linear_logprobs(x.hidden, x.weight, x.labels, x.rows.cu, **_head(x))
        tokens = sum(x.rows.counts_host) if totals.tokens is None else totals.tokens
        return -logps.sum() / tokens, logps.detach()

    @staticmethod
    def wrpo_loss(spec, logps, ref_logps, lengths):
        loss, _ = wrpo_loss(spec, logps, ref_logps, lengths)
        return loss.to(logps.dtype)


BACKEND = ReferenceBackend()
