"""Chunked PyTorch backend: runs anywhere (CPU, CI, GPU fallback); never materialises [N, V] logits."""

from __future__ import annotations

from ..chunked import run_fused, run_logprobs
from .preference_loss import PreferenceLossFunction
from .rows import TORCH_ROW_OPS


def linear_logprobs(hidden, weight, labels, rows, *, bias, opts, reduction, chunk_tokens):
    """Log-probs of packed rows ([S] or [N]); ``rows``: the validated ``api.PackedRows``."""
    return run_logprobs(TORCH_ROW_OPS, hidden, weight, labels, rows, bias, opts, reduction, chunk_tokens)


def fused_linear_wrpo_loss(
    spec, hidden, weight, labels, rows, ref_logps, *, bias, opts, nll_weight, chunk_tokens
):
    """(loss, logps [B, K]) of packed groups in one pass over chunks of whole groups."""
    return run_fused(
        TORCH_ROW_OPS, spec, hidden, weight, labels, rows, ref_logps, bias, opts, nll_weight, chunk_tokens
    )


def wrpo_loss(spec, logps, ref_logps, lengths):
    """Mean group loss from [B, K] log-probs, differentiable w.r.t. ``logps`` (and ``ref_logps``)."""
    return PreferenceLossFunction.apply(logps, ref_logps, lengths, spec)
