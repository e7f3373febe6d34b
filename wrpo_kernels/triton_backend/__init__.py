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
from ..head_inputs import HeadInputs
from .forward_kernel import forward_token_logprobs
from .loss_kernel import group_loss_from_logps
from .ops import TRITON_ROW_OPS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(
            f"backend='triton' takes fp32, fp16 or bf16 inputs, got {dtype}; use backend='torch'"
        )


def linear_logprobs(x: HeadInputs, *, reduction: str, chunk_tokens: int | None):
    """Under no_grad (or with nothing to differentiate): the forward-only kernel; else, or for a head
    sharded over the vocabulary, two-pass chunks."""
    _check_dtype(x.hidden.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x.hidden, x.weight, x.bias)
    )
    if needs_grad or x.opts.shard is not None:  # the forward-only kernel reads the whole vocabulary
        return run_logprobs(TRITON_ROW_OPS, x, reduction=reduction, chunk_tokens=chunk_tokens)

    def forward_only(h, lab, r):
        targets = Targets.build(lab, r, x.opts.ignore_index, h.dtype)
        tok, _ = forward_token_logprobs(h, x.weight, x.bias, targets.safe, targets.valid, x.opts)
        return reduce_token_logprobs(tok, targets, reduction)

    return on_labelled_rows(forward_only, x, reduction)


def fused_linear_wrpo_loss(x: HeadInputs, **loss):
    """``FusedLoss`` (loss, logps [B, K], nll) in one pass over chunks of whole groups, row work in
    Triton kernels; ``loss`` as :func:`~..chunked.run_fused`."""
    _check_dtype(x.hidden.dtype)
    return run_fused(TRITON_ROW_OPS, x, **loss)


def fused_linear_nll_loss(x: HeadInputs, **loss):
    """(mean NLL, log-probs [S]) in one pass over row tiles, row work in Triton kernels; ``loss`` as
    :func:`~..chunked.run_nll`."""
    _check_dtype(x.hidden.dtype)
    return run_nll(TRITON_ROW_OPS, x, **loss)


def wrpo_loss(spec, logps, ref_logps, lengths):
    """Mean group loss from [B, K] log-probs through the group-loss kernel."""
    _check_dtype(logps.dtype)
    return PreferenceLossFunction.apply(logps, ref_logps, lengths, spec, group_loss_from_logps)
