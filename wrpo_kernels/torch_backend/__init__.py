"""Chunked PyTorch backend: runs anywhere (CPU, CI, GPU fallback); never materialises [N, V] logits.

On CPU tensors the row work runs in the native kernels of ``csrc/`` when they build (see
``wrpo_kernels.native``), else in torch element-wise ops.
"""

from __future__ import annotations

from .. import native
from ..chunked import PreferenceLossFunction, run_fused, run_logprobs, run_nll
from ..head_inputs import HeadInputs
from .native_rows import NATIVE_ROW_OPS
from .torch_rows import TORCH_ROW_OPS


def row_ops(device):
    """The native row ops for CPU tensors when the extension is usable, else the pure-torch ones."""
    return NATIVE_ROW_OPS if native.row_kernels_enabled(device) else TORCH_ROW_OPS


def linear_logprobs(x: HeadInputs, **options):
    """Log-probs of packed rows ([S] or [N]), two-pass; ``options`` as :func:`~..chunked.run_logprobs`."""
    return run_logprobs(row_ops(x.hidden.device), x, **options)


def fused_linear_wrpo_loss(x: HeadInputs, **loss):
    """``FusedLoss`` (loss, logps [B, K], nll) of packed groups in one pass over chunks of whole groups;
    ``loss`` as :func:`~..chunked.run_fused`."""
    return run_fused(row_ops(x.hidden.device), x, **loss)


def fused_linear_nll_loss(x: HeadInputs, **loss):
    """(mean NLL, log-probs [S]) of packed rows in one pass over row tiles; ``loss`` as
    :func:`~..chunked.run_nll`."""
    return run_nll(row_ops(x.hidden.device), x, **loss)


def wrpo_loss(spec, logps, ref_logps, lengths):
    """Mean group loss from [B, K] log-probs, differentiable w.r.t. ``logps`` (and ``ref_logps``)."""
    return PreferenceLossFunction.apply(logps, ref_logps, lengths, spec)
