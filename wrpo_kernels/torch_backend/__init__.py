"""Chunked PyTorch backend: runs anywhere (CPU, CI, GPU fallback); never materialises [N, V] logits.

On CPU tensors the row work runs in the native kernels of ``csrc/`` when they build (see
``wrpo_kernels.native``), else in torch element-wise ops.
"""

from __future__ import annotations

from .. import native
from ..chunked import PreferenceLossFunction, run_fused, run_logprobs, run_nll
from ..totals import OWN_COUNTS
from .native_rows import NATIVE_ROW_OPS
from .rows import TORCH_ROW_OPS


def row_ops(device):
    """The native row ops for CPU tensors when the extension is usable, else the pure-torch ones."""
    return NATIVE_ROW_OPS if native.row_kernels_enabled(device) else TORCH_ROW_OPS


def linear_logprobs(hidden, weight, labels, rows, *, bias, opts, reduction, chunk_tokens):
    """Log-probs of packed rows ([S] or [N]); ``rows``: the validated ``api.PackedRows``."""
    ops = row_ops(hidden.device)
    return run_logprobs(ops, hidden, weight, labels, rows, bias, opts, reduction, chunk_tokens)


def fused_linear_wrpo_loss(
    spec, hidden, weight, labels, rows, ref_logps, *, bias, opts, nll_weight, chunk_tokens, totals=OWN_COUNTS
):
    """(loss, logps [B, K]) of packed groups in one pass over chunks of whole groups."""
    ops = row_ops(hidden.device)
    return run_fused(
        ops, spec, hidden, weight, labels, rows, ref_logps, bias, opts, nll_weight, chunk_tokens, totals
    )


def fused_linear_nll_loss(hidden, weight, labels, rows, *, bias, opts, chunk_tokens, totals):
    """(mean NLL, log-probs [S]) of packed rows in one pass over row tiles."""
    ops = row_ops(hidden.device)
    return run_nll(ops, hidden, weight, labels, rows, bias, opts, chunk_tokens, totals)


def wrpo_loss(spec, logps, ref_logps, lengths):
    """Mean group loss from [B, K] log-probs, differentiable w.r.t. ``logps`` (and ``ref_logps``)."""
    return PreferenceLossFunction.apply(logps, ref_logps, lengths, spec)
