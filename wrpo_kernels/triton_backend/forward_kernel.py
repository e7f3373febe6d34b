"""Forward-only log-probs with no [N, V] buffer at all (docs/method.md §4).

For the reference model and evaluation (``linear_logprobs`` under ``torch.no_grad()``): each
program takes BLOCK_N rows, computes their logits tile by tile on chip (``tl.dot`` over H),
keeps an online max / sum-exp across vocabulary tiles and picks the target logit in the tile
that holds it. Only lse [N] and log p [N] are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .indexing import wide_offset
from .launch import Launch, device_arch, launch
from .row_kernels import softcapped


@dataclass(frozen=True)
class Tiles:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# Tiles per GPU generation and operand width, chosen with ptxas on the compiled kernels so that no
# variant spills (registers, spills and shared memory of each: benchmarks/results/triton_resources.json).
# 16-bit operands: 64 x 128 logit tiles; Ampere takes H in steps of 32 (steps of 64 spilled when H is
# not a multiple of 16), Hopper in steps of 64 for its wgmma. fp32 operands keep exact fp32 products
# (input_precision="ieee", as torch.mm computes them by default, not tf32) on the FMA units, in
# 32 x 64 tiles: larger ones spilled on one target or the other.
TILES = {
    ("sm80", "16-bit"): Tiles(64, 128, 32, num_warps=8, num_stages=3),
    ("sm90", "16-bit"): Tiles(64, 128, 64, num_warps=8, num_stages=3),
    ("sm80", "fp32"): Tiles(32, 64, 32, num_warps=8, num_stages=3),
    ("sm90", "fp32"): Tiles(32, 64, 32, num_warps=8, num_stages=3),
}


def forward_tiles(arch: int | None, dtype: torch.dtype) -> Tiles:
    """The tiles for a device of compute capability ``arch`` (80, 86, 90, ...; None: the interpreter,
    which takes Hopper's) and operands of ``dtype``."""
    family = "sm80" if arch is not None and arch < 90 else "sm90"
    return TILES[family, "fp32" if dtype == torch.float32 else "16-bit"]


# Specialised on what the tiles load (h, w, b, their strides, V, H); not on the per-row vectors and N,
# read or written once per program: fewer compiled variants (N = 1 would be one of its own).
@triton.jit(do_not_specialize=["labels_ptr", "valid_ptr", "lse_ptr", "logp_ptr", "N"])
def _forward_logprobs_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, valid_ptr, lse_ptr, logp_ptr,
    N, V, H, stride_h, stride_w, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    labels = tl.load(labels_ptr + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    tgt = tl.zeros([BLOCK_N], tl.float32)
    hk0 = tl.arange(0, BLOCK_H)
    h_rows = h_ptr + wide_offset(rows, stride_h)[:, None]
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        w_rows = w_ptr + wide_offset(cols, stride_w)[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + hk0
            hmask = hk < H
            a = tl.load(h_rows + hk[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
            w = tl.load(w_rows + hk[None, :], mask=cmask[:, None] & hmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        z, _ = softcapped(acc, softcap, inv_temp, HAS_SOFTCAP)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
    lse = m + tl.log(s)
    valid = tl.load(valid_ptr + rows, mask=rmask, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(logp_ptr + rows, (tgt - lse) * valid, mask=rmask)


def forward_launch(hidden, weight, bias, safe_labels, valid, lse, logp, opts) -> Launch:
    """The launch that writes lse [N] and log p [N] (fp32) for hidden [N, H], weight [V, H] (row-major)."""
    N, H = hidden.shape
    V = weight.shape[0]
    t = forward_tiles(device_arch(hidden.device), hidden.dtype)
    softcap = float(opts.softcap) if opts.softcap is not None else 1.0
    args = (
        hidden, weight, bias if bias is not None else weight, safe_labels, valid, lse, logp,
        N, V, H, hidden.stride(0), weight.stride(0), softcap, 1.0 / float(opts.temperature),
    )  # fmt: skip
    constexprs = {
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": opts.softcap is not None,
        "IEEE": hidden.dtype == torch.float32,
        "BLOCK_N": t.block_n,
        "BLOCK_V": t.block_v,
        "BLOCK_H": t.block_h,
    }
    grid = (triton.cdiv(N, t.block_n),)
    return Launch(_forward_logprobs_kernel, grid, args, constexprs, t.num_warps, t.num_stages)


def forward_token_logprobs(hidden, weight, bias, safe_labels, valid, opts):
    """hidden [N, H], weight [V, H], bias [V] | None -> log p [N] (0 where ``valid`` is 0), lse [N]; fp32."""
    N = hidden.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    weight = weight.contiguous()
    launch(forward_launch(hidden, weight, bias, safe_labels, valid.to(torch.float32), lse, logp, opts))
    return logp, lse
