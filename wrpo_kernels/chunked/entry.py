"""Entry points of a chunked backend: keep the labelled rows, build the plan, run the autograd function.

Rows whose label is ``ignore_index`` (prompt tokens, padding) never reach the head (docs/method.md §4):
the GEMMs and row work see only the labelled rows, and per-token results come back for every row.
Each entry takes the validated :class:`~wrpo_kernels.head_inputs.HeadInputs` and the row ops the
backend picked; everything else is keyword-only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..output import FusedLoss
from ..packing import PackedRows, keep_labelled_rows, scatter_rows
from ..vocab_parallel import replicated_input, vocab_parallel
from .fused_loss import FusedLinearWRPOFunction, FusedPlan
from .fused_nll import FusedLinearNLLFunction, NLLPlan
from .logprobs import LinearLogprobsFunction, LogprobPlan
from .options import default_chunk_tokens
from .row_ops import RowOps
from .schedule import plan_group_chunks
from .targets import Targets

if TYPE_CHECKING:
    from ..head_inputs import HeadInputs
    from ..objective import PreferenceSpec
    from ..totals import Totals


def on_labelled_rows(compute, x: HeadInputs, reduction: str):
    """``compute(hidden, labels, rows)`` on the labelled rows of ``x`` only; with ``reduction="none"``
    its per-token result is scattered back to all rows (0 where the label is ignored)."""
    hidden, labels, rows, kept = keep_labelled_rows(x.hidden, x.labels, x.rows, x.opts.ignore_index)
    out = compute(hidden, labels, rows)
    return scatter_rows(out, kept, x.hidden.shape[0]) if reduction == "none" else out


def _chunk(x: HeadInputs, chunk_tokens: int | None) -> int:
    return chunk_tokens or default_chunk_tokens(x.opts.vocab(x.weight), x.hidden.device)


def run_logprobs(ops: RowOps, x: HeadInputs, *, reduction: str, chunk_tokens: int | None):
    """Log-probs [S] or [N] of packed rows with ``ops`` doing the row work (two-pass)."""
    chunk, opts = _chunk(x, chunk_tokens), x.opts
    ops = vocab_parallel(ops, opts.shard)

    def compute(h, lab, r):
        plan = LogprobPlan(Targets.build(lab, r, opts.ignore_index, h.dtype), opts, reduction, chunk, ops)
        h = replicated_input(h, opts.shard)  # dX summed over the ranks: the labelled rows only
        return LinearLogprobsFunction.apply(h, x.weight, x.bias, plan)

    return on_labelled_rows(compute, x, reduction)


class _SinglePassInputs(NamedTuple):
    ops: RowOps
    chunk: int
    hidden: torch.Tensor
    rows: PackedRows
    targets: Targets
    needs: tuple[bool, bool, bool]


def _single_pass_inputs(ops: RowOps, x: HeadInputs, chunk_tokens: int | None) -> _SinglePassInputs:
    """What both single-pass losses start from: the row ops (vocabulary-parallel for a sharded head),
    the chunk size, the labelled rows only (their dX summed over the ranks of a sharded head), their
    targets, and which of hidden, weight, bias need gradients."""
    opts = x.opts
    hidden, labels, rows, _ = keep_labelled_rows(x.hidden, x.labels, x.rows, opts.ignore_index)
    hidden = replicated_input(hidden, opts.shard)
    targets = Targets.build(labels, rows, opts.ignore_index, hidden.dtype)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, x.weight, x.bias))
    return _SinglePassInputs(
        vocab_parallel(ops, opts.shard), _chunk(x, chunk_tokens), hidden, rows, targets, needs
    )


def run_fused(
    ops: RowOps,
    x: HeadInputs,
    *,
    spec: PreferenceSpec,
    ref_logps: torch.Tensor | None,
    nll_weight: float,
    totals: Totals,
    chunk_tokens: int | None,
):
    """:class:`FusedLoss` (loss, logps [B, K], nll) in one pass over chunks of whole groups, ``ops``
    doing the row work.

    ``totals``: the denominators of the batch means (0-dim tensors), None for this batch's own."""
    p = _single_pass_inputs(ops, x, chunk_tokens)
    chunks = tuple(plan_group_chunks(p.rows.cu_host, spec.responses_per_prompt, p.chunk))
    plan = FusedPlan(spec, p.targets, x.opts, chunks, p.chunk, float(nll_weight), p.ops, totals)
    return FusedLoss(*FusedLinearWRPOFunction.apply(p.hidden, x.weight, x.bias, ref_logps, plan, p.needs))


def run_nll(ops: RowOps, x: HeadInputs, *, totals: Totals, chunk_tokens: int | None):
    """(mean NLL, per-sequence log-probs [S]) in one pass over row tiles, ``ops`` doing the row work.

    ``totals.tokens``: the mean's denominator (0-dim tensor), None for this call's labelled rows."""
    p = _single_pass_inputs(ops, x, chunk_tokens)
    plan = NLLPlan(p.targets, x.opts, p.chunk, p.ops, totals)
    return FusedLinearNLLFunction.apply(p.hidden, x.weight, x.bias, plan, p.needs)
