"""Forward-only log-probs with no [N, V] buffer at all (docs/method.md §4).

For the reference model and evaluation (``linear_logprobs`` under ``torch.no_grad()``): each
program takes BLOCK_N rows, computes their logits tile by tile on chip (``tl.dot`` over H),
keeps an online max / sum-exp across vocabulary tiles and picks the target logit in the tile
that holds it. Only lse [N] and log p [N] are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_kernels import softcapped

# Fixed tiles, sized for Hopper/Ampere shared memory with bf16 operands (2 x 64x64 + 128x64 tiles
# per stage); tl.dot needs every dimension >= 16.
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
NUM_WARPS = 8


@triton.jit
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
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + hk0
            hmask = hk < H
            a = tl.load(
                h_ptr + rows[:, None] * stride_h + hk[None, :],
                mask=rmask[:, None] & hmask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + cols[:, None] * stride_w + hk[None, :],
                mask=cmask[:, None] & hmask[None, :],
                other=0.0,
            )
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


def forward_token_logprobs(hidden, weight, bias, safe_labels, valid, opts):
    """hidden [N, H], weight [V, H], bias [V] | None -> log p [N] (0 where ``valid`` is 0), lse [N]; fp32."""
    N, H = hidden.shape
    V = weight.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    softcap = float(opts.softcap) if opts.softcap is not None else 1.0
    weight = weight.contiguous()
    _forward_logprobs_kernel[(triton.cdiv(N, BLOCK_N),)](
        hidden, weight, bias if bias is not None else weight, safe_labels, valid.to(torch.float32), lse, logp,
        N, V, H, hidden.stride(0), weight.stride(0), softcap, 1.0 / float(opts.temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, IEEE=hidden.dtype == torch.float32,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS,
    )  # fmt: skip
    return logp, lse
