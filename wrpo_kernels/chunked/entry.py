"""Entry points of a chunked backend: keep the labelled rows, build the plan, run the autograd function.

Rows whose label is ``ignore_index`` (prompt tokens, padding) never reach the head (docs/method.md §4):
the GEMMs and row work see only the labelled rows, and per-token results come back for every row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..packing import PackedRows, keep_labelled_rows, scatter_rows
from ..totals import OWN_COUNTS, Totals
from ..vocab_parallel import replicated_input, vocab_parallel
from .fused_loss import FusedLinearWRPOFunction, FusedPlan
from .fused_nll import FusedLinearNLLFunction, NLLPlan
from .logprobs import LinearLogprobsFunction, LogprobPlan
from .options import HeadOptions, default_chunk_tokens
from .row_ops import RowOps
from .schedule import plan_group_chunks
from .targets import Targets


def on_labelled_rows(compute, hidden, labels, rows: PackedRows, opts: HeadOptions, reduction: str):
    """``compute(hidden, labels, rows)`` on the labelled rows only; with ``reduction="none"`` its
    per-token result is scattered back to all rows (0 where the label is ignored)."""
    N = hidden.shape[0]
    hidden, labels, rows, kept = keep_labelled_rows(hidden, labels, rows, opts.ignore_index)
    out = compute(hidden, labels, rows)
    return scatter_rows(out, kept, N) if reduction == "none" else out


def run_logprobs(ops: RowOps, hidden, weight, labels, rows, bias, opts, reduction, chunk_tokens):
    """Log-probs [S] or [N] of packed rows with ``ops`` doing the row work (two-pass)."""
    chunk = chunk_tokens or default_chunk_tokens(opts.vocab(weight), hidden.device)
    ops = vocab_parallel(ops, opts.shard)

    def compute(h, lab, r):
        plan = LogprobPlan(Targets.build(lab, r, opts.ignore_index, h.dtype), opts, reduction, chunk, ops)
        h = replicated_input(h, opts.shard)  # dX summed over the ranks: the labelled rows only
        return LinearLogprobsFunction.apply(h, weight, bias, plan)

    return on_labelled_rows(compute, hidden, labels, rows, opts, reduction)


class _SinglePassInputs(NamedTuple):
    ops: RowOps
    chunk: int
    hidden: torch.Tensor
    rows: PackedRows
    targets: Targets
    needs: tuple[bool, bool, bool]


def _single_pass_inputs(ops, hidden, weight, labels, rows, bias, opts, chunk_tokens) -> _SinglePassInputs:
    """What both single-pass losses start from: the row ops (vocabulary-parallel for a sharded head),
    the chunk size, the labelled rows only (their dX summed over the ranks of a sharded head), their
    targets, and which of hidden, weight, bias need gradients."""
    chunk = chunk_tokens or default_chunk_tokens(opts.vocab(weight), hidden.device)
    hidden, labels, rows, _ = keep_labelled_rows(hidden, labels, rows, opts.ignore_index)
    hidden = replicated_input(hidden, opts.shard)
    targets = Targets.build(labels, rows, opts.ignore_index, hidden.dtype)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _SinglePassInputs(vocab_parallel(ops, opts.shard), chunk, hidden, rows, targets, needs)


def run_fused(
    ops: RowOps,
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
    totals: Totals = OWN_COUNTS,
):
    """(loss, logps [B, K]) in one pass over chunks of whole groups, ``ops`` doing the row work.

    ``totals``: the denominators of the batch means (0-dim tensors), None for this batch's own."""
    x = _single_pass_inputs(ops, hidden, weight, labels, rows, bias, opts, chunk_tokens)
    chunks = tuple(plan_group_chunks(x.rows.cu_host, spec.responses_per_prompt, x.chunk))
    plan = FusedPlan(spec, x.targets, opts, chunks, x.chunk, float(nll_weight), x.ops, totals)
    return FusedLinearWRPOFunction.apply(x.hidden, weight, bias, ref_logps, plan, x.needs)


def run_nll(ops: RowOps, hidden, weight, labels, rows, bias, opts, chunk_tokens, totals: Totals = OWN_COUNTS):
    """(mean NLL, per-sequence log-probs [S]) in one pass over row tiles, ``ops`` doing the row work.

    ``totals.tokens``: the mean's denominator (0-dim tensor), None for this call's labelled rows."""
    x = _single_pass_inputs(ops, hidden, weight, labels, rows, bias, opts, chunk_tokens)
    plan = NLLPlan(x.targets, opts, x.chunk, x.ops, totals)
    return FusedLinearNLLFunction.apply(x.hidden, weight, bias, plan, x.needs)
