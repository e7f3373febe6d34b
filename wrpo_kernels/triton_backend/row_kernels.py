"""Row kernels over a chunk's logits buffer (docs/method.md §4).

For row i with logits x (bf16/fp16/fp32 in memory, fp32 math), z = softcap(x) / T with
softcap(x) = c * tanh(x / c):
  stats: one read of the row with an online max / sum-exp -> lse_i = log sum_v exp z_v and the
         target logit z[label_i]; padded columns (v >= V) never enter the sum.
  grad:  in place, x <- scale_i * (onehot(label_i) - exp(z - lse_i)) * (1 - tanh^2(x / c)) / T,
         i.e. dL/dx for dL/d(log p_i) = scale_i (0 for ignored rows).
One program per row, looping over the vocabulary in BLOCK_V columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import wide_offset
from .launch import Launch, launch

# One row per program; 4096 columns per step keeps a Hopper/Ampere SM busy with 8 warps (fixed
# config, chosen for large vocabularies: 32k-256k); smaller vocabularies use the next power of 2.
# Same config on sm_80 and sm_90: no spills on either (benchmarks/results/triton_resources.json).
MAX_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def softcapped(x, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """(z, t): z = softcap * tanh(x / softcap) / T and t = tanh(x / softcap) (t = x without softcap)."""
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
        z = softcap * t * inv_temp
    else:
        t = x
        z = x * inv_temp
    return z, t


# Per-row scalars (label, lse, target, scale): one element per program, so 16-byte alignment buys
# nothing; not specialising on it keeps one compiled variant whatever row a chunk starts at.
@triton.jit(do_not_specialize=["labels_ptr", "lse_ptr", "target_ptr"])
def _row_stats_kernel(
    x_ptr, stride, labels_ptr, lse_ptr, target_ptr, V, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + wide_offset(row, stride)
    label = tl.load(labels_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # running max per lane
    s = tl.zeros([BLOCK_V], tl.float32)  # running sum of exp(z - m) per lane
    tgt = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = softcapped(x, softcap, inv_temp, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        rescale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * rescale + tl.where(mask, tl.exp(z - m_new), 0.0)
        m = m_new
        tgt += tl.where(cols == label, z, 0.0)
    row_max = tl.max(m, 0)
    total = tl.sum(s * tl.exp(m - row_max), 0)
    tl.store(lse_ptr + row, row_max + tl.log(total))
    tl.store(target_ptr + row, tl.sum(tgt, 0))


@triton.jit(do_not_specialize=["labels_ptr", "lse_ptr", "scale_ptr"])
def _row_grad_kernel(
    x_ptr, stride, labels_ptr, lse_ptr, scale_ptr, V, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + wide_offset(row, stride)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(scale_ptr + row) * inv_temp
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, t = softcapped(x, softcap, inv_temp, HAS_SOFTCAP)
        g = coef * (tl.where(cols == label, 1.0, 0.0) - tl.exp(z - lse))
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        tl.store(x_row + cols, g.to(x_ptr.dtype.element_ty), mask=mask)


def _constexprs(logits: torch.Tensor, opts) -> dict:
    V = logits.shape[1]
    return {"HAS_SOFTCAP": opts.softcap is not None, "BLOCK_V": min(MAX_BLOCK_V, triton.next_power_of_2(V))}


def _head_args(opts):
    softcap = float(opts.softcap) if opts.softcap is not None else 1.0
    return softcap, 1.0 / float(opts.temperature)


def row_stats_launch(logits, safe_labels, lse, target, opts) -> Launch:
    """Reads logits [n, V] (any row stride), writes lse [n] and the target logit [n] (fp32)."""
    n, V = logits.shape
    args = (logits, logits.stride(0), safe_labels, lse, target, V, *_head_args(opts))
    return Launch(_row_stats_kernel, (n,), args, _constexprs(logits, opts), num_warps=NUM_WARPS)


def row_grad_launch(logits, safe_labels, lse, scale, opts) -> Launch:
    """Overwrites logits [n, V] with dL/dlogits given lse [n] and dL/d(log p) = ``scale`` [n] (fp32)."""
    n, V = logits.shape
    args = (logits, logits.stride(0), safe_labels, lse, scale, V, *_head_args(opts))
    return Launch(_row_grad_kernel, (n,), args, _constexprs(logits, opts), num_warps=NUM_WARPS)


def row_stats(logits: torch.Tensor, safe_labels: torch.Tensor, opts):
    """logits [n, V] (row stride may exceed V) -> lse [n], target logit [n] (fp32); logits untouched."""
    n = logits.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    target = torch.empty(n, dtype=torch.float32, device=logits.device)
    launch(row_stats_launch(logits, safe_labels, lse, target, opts))
    return lse, target


def row_grad_(logits: torch.Tensor, safe_labels, scale, lse, opts) -> torch.Tensor:
    """In place: logits [n, V] <- dL/dlogits for dL/d(log p) = ``scale`` [n] (fp32), given ``lse`` [n]."""
    scale = scale.to(torch.float32).contiguous()
    launch(row_grad_launch(logits, safe_labels, lse.contiguous(), scale, opts))
    return logits
