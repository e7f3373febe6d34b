"""Entry points of a chunked backend: build the plan, run the autograd function."""

from __future__ import annotations

import torch

from .fused_loss import FusedLinearWRPOFunction, FusedPlan
from .logprobs import LinearLogprobsFunction, LogprobPlan
from .options import default_chunk_tokens
from .schedule import plan_group_chunks
from .targets import Targets


def run_logprobs(ops, hidden, weight, labels, rows, bias, opts, reduction, chunk_tokens):
    """Log-probs [S] or [N] of packed rows with ``ops`` doing the row work (two-pass)."""
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.device)
    targets = Targets.build(labels, rows, opts.ignore_index, hidden.dtype)
    plan = LogprobPlan(targets, opts, reduction, chunk, ops)
    return LinearLogprobsFunction.apply(hidden, weight, bias, plan)


def run_fused(
    ops,
    spec,
    hidden,
    weight,
    labels,
    rows,
    ref_logps,
    bias,
    opts,
    nll_weight,
    chunk_tokens,
    norms=(None, None),
):
    """(loss, logps [B, K]) in one pass over chunks of whole groups, ``ops`` doing the row work.

    ``norms``: (groups, first-chosen tokens) denominators of the batch means, None for this batch's own."""
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.device)
    targets = Targets.build(labels, rows, opts.ignore_index, hidden.dtype)
    chunks = tuple(plan_group_chunks(rows.cu_host, spec.responses_per_prompt, chunk))
    plan = FusedPlan(spec, targets, opts, chunks, chunk, float(nll_weight), ops, *norms)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return FusedLinearWRPOFunction.apply(hidden, weight, bias, ref_logps, plan, needs)
