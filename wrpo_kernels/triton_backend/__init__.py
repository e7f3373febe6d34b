"""Triton backend: row kernels, the group-loss kernel and a forward-only tiled kernel (docs/method.md §4).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it; the
variable must be set before this package is imported). Inputs: fp32, fp16, bf16. Every launch is a
``launch.Launch`` record (tiles chosen per GPU generation and dtype in ``forward_kernel.TILES``), so
``aot`` compiles exactly what the launchers would run, for sm_80 and sm_90, without a GPU.
"""

from __future__ import annotations

import torch

from ..chunked import (
    PreferenceLossFunction,
    Targets,
    on_labelled_rows,
    reduce_token_logprobs,
    run_fused,
    run_logprobs,
    run_nll,
)
from ..totals import OWN_COUNTS
from .forward_kernel import forward_token_logprobs
from .loss_kernel import group_loss_from_logps
from .ops import TRITON_ROW_OPS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(
            f"backend='triton' takes fp32, fp16 or bf16 inputs, got {dtype}; use backend='torch'"
        )


def linear_logprobs(hidden, weight, labels, rows, *, bias, opts, reduction, chunk_tokens):
    """Under no_grad (or with nothing to differentiate): the forward-only kernel; else, or for a head
    sharded over the vocabulary, two-pass chunks."""
    _check_dtype(hidden.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if needs_grad or opts.shard is not None:  # the forward-only kernel reads the whole vocabulary
        return run_logprobs(TRITON_ROW_OPS, hidden, weight, labels, rows, bias, opts, reduction, chunk_tokens)

    def forward_only(h, lab, r):
        targets = Targets.build(lab, r, opts.ignore_index, h.dtype)
        tok, _ = forward_token_logprobs(h, weight, bias, targets.safe, targets.valid, opts)
        return reduce_token_logprobs(tok, targets, reduction)

    return on_labelled_rows(forward_only, hidden, labels, rows, opts, reduction)


def fused_linear_wrpo_loss(
    spec, hidden, weight, labels, rows, ref_logps, *, bias, opts, nll_weight, chunk_tokens, totals=OWN_COUNTS
):
    """(loss, logps [B, K]) in one pass over chunks of whole groups, row work in Triton kernels."""
    _check_dtype(hidden.dtype)
    return run_fused(
        TRITON_ROW_OPS, spec, hidden, weight, labels, rows, ref_logps, bias, opts, nll_weight, chunk_tokens,
        totals,
    )  # fmt: skip


def fused_linear_nll_loss(hidden, weight, labels, rows, *, bias, opts, chunk_tokens, totals):
    """(mean NLL, log-probs [S]) in one pass over row tiles, row work in Triton kernels."""
    _check_dtype(hidden.dtype)
    return run_nll(TRITON_ROW_OPS, hidden, weight, labels, rows, bias, opts, chunk_tokens, totals)


def wrpo_loss(spec, logps, ref_logps, lengths):
    """Mean group loss from [B, K] log-probs through the group-loss kernel."""
    _check_dtype(logps.dtype)
    return PreferenceLossFunction.apply(logps, ref_logps, lengths, spec, group_loss_from_logps)
