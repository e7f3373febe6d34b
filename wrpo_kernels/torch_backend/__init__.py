"""Chunked PyTorch backend: runs anywhere (CPU, CI, GPU fallback); never materialises [N, V] logits."""

from __future__ import annotations

import torch

from ..objective import PreferenceSpec
from .fused_loss import FusedLinearWRPOFunction, FusedPlan
from .logprobs import LinearLogprobsFunction, LogprobPlan
from .preference_loss import PreferenceLossFunction
from .rows import HeadOptions, Targets, default_chunk_tokens
from .schedule import plan_group_chunks


def linear_logprobs(hidden, weight, labels, rows, *, bias, opts: HeadOptions, reduction, chunk_tokens):
    """Log-probs of packed rows ([S] or [N]); ``rows``: the validated ``api.PackedRows``."""
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.device)
    targets = Targets.build(labels, rows.seq, rows.counts, opts.ignore_index, hidden.dtype)
    return LinearLogprobsFunction.apply(hidden, weight, bias, LogprobPlan(targets, opts, reduction, chunk))


def fused_linear_wrpo_loss(
    spec: PreferenceSpec,
    hidden,
    weight,
    labels,
    rows,
    ref_logps,
    *,
    bias,
    opts: HeadOptions,
    nll_weight,
    chunk_tokens,
):
    """(loss, logps [B, K]) of packed groups in one pass over chunks of whole groups."""
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.device)
    targets = Targets.build(labels, rows.seq, rows.counts, opts.ignore_index, hidden.dtype)
    chunks = tuple(plan_group_chunks(rows.cu_host, spec.responses_per_prompt, chunk))
    plan = FusedPlan(spec, targets, opts, chunks, chunk, float(nll_weight))
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return FusedLinearWRPOFunction.apply(hidden, weight, bias, ref_logps, plan, needs)


def wrpo_loss(spec: PreferenceSpec, logps, ref_logps, lengths):
    """Mean group loss from [B, K] log-probs, differentiable w.r.t. ``logps`` (and ``ref_logps``)."""
    return PreferenceLossFunction.apply(logps, ref_logps, lengths, spec)
