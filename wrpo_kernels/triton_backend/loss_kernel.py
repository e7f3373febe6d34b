"""Segment sums + the WRPO group loss in one launch (docs/method.md §3).

One program per group g of K consecutive sequences: s_k = sum of its tokens' log-probs, then

    r_k = c_k (s_k - s_ref_k),  c = beta | beta / n | 1 / n   (dpo | simpo | ipo)
    m   = sum_k a_k r_k - gamma,  a = [w_1..w_C, -1/R, ..., -1/R]
    L   = -(1-eps) log sigmoid(m) - eps log sigmoid(-m)  |  (m - 1/(2 beta))^2
    dL/ds_k = dL/dm * a_k * c_k.

Any K (up to BLOCK_K lanes), any chosen weights (``a`` is passed in).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..objective import PreferenceSpec, margin_coefficients
from .launch import Launch, launch

LOSS_CODES = {"dpo": 0, "simpo": 1, "ipo": 2}
BLOCK_T = 256


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


# Gathers at data-dependent offsets: alignment or value hints buy nothing, so one variant per loss
# type and K serves every chunk (the first group of a chunk, ``seq0``, changes from chunk to chunk).
_NO_HINTS = [
    "tok_ptr",
    "cu_ptr",
    "ref_ptr",
    "counts_ptr",
    "coef_ptr",
    "logps_ptr",
    "loss_ptr",
    "dlogps_ptr",
    "seq0",
    "K",
]


@triton.jit(do_not_specialize=_NO_HINTS)
def _group_loss_kernel(
    tok_ptr, cu_ptr, ref_ptr, counts_ptr, coef_ptr, logps_ptr, loss_ptr, dlogps_ptr,
    seq0, K, beta, gamma, eps,
    LOSS: tl.constexpr, HAS_REF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    seqs = seq0 + g * K + ks  # global sequence index of each response of the group
    starts = tl.load(cu_ptr + seqs, mask=kmask, other=0)
    ends = tl.load(cu_ptr + seqs + 1, mask=kmask, other=0)
    first = tl.load(cu_ptr + seq0 + g * K)
    last = tl.load(cu_ptr + seq0 + g * K + K)
    s = tl.zeros([BLOCK_K], tl.float32)
    for t0 in range(first, last, BLOCK_T):
        toks = t0 + tl.arange(0, BLOCK_T)
        vals = tl.load(tok_ptr + toks, mask=toks < last, other=0.0)
        member = (toks[None, :] >= starts[:, None]) & (toks[None, :] < ends[:, None])
        s += tl.sum(tl.where(member, vals[None, :], 0.0), 1)
    n = tl.load(counts_ptr + seqs, mask=kmask, other=1).to(tl.float32)
    if LOSS == 0:
        c = tl.zeros([BLOCK_K], tl.float32) + beta
    elif LOSS == 1:
        c = beta / n
    else:
        c = 1.0 / n
    delta = s
    if HAS_REF:
        delta = s - tl.load(ref_ptr + seqs, mask=kmask, other=0.0)
    a = tl.load(coef_ptr + ks, mask=kmask, other=0.0)
    m = tl.sum(a * c * delta, 0) - gamma
    if LOSS == 2:
        d = m - 0.5 / beta
        loss = d * d
        dloss_dm = 2.0 * d
    else:
        loss = -(1.0 - eps) * _log_sigmoid(m) - eps * _log_sigmoid(-m)
        dloss_dm = -(1.0 - eps) * tl.sigmoid(-m) + eps * tl.sigmoid(m)
    local = g * K + ks
    tl.store(logps_ptr + local, s, mask=kmask)
    tl.store(dlogps_ptr + local, dloss_dm * a * c, mask=kmask)
    tl.store(loss_ptr + g, loss)


def group_loss_launch(
    spec: PreferenceSpec, tok, cu, counts, ref, coef, g0: int, g1: int, logps, loss, dlogps
):
    """The launch for groups [g0, g1): one program per group (see :func:`group_loss`)."""
    K = spec.responses_per_prompt
    args = (
        tok, cu, ref, counts, coef, logps, loss, dlogps,
        g0 * K, K, spec.beta, spec.gamma, spec.label_smoothing,
    )  # fmt: skip
    constexprs = {
        "LOSS": LOSS_CODES[spec.loss_type],
        "HAS_REF": spec.needs_reference,
        "BLOCK_K": triton.next_power_of_2(K),
        "BLOCK_T": BLOCK_T,
    }
    return Launch(_group_loss_kernel, (g1 - g0,), args, constexprs)


def group_loss(spec: PreferenceSpec, tok, cu, counts, ref, g0: int, g1: int):
    """Groups [g0, g1): per-token log-probs ``tok`` [N] fp32, sequence bounds ``cu`` [S+1], token
    counts [S], ``ref`` [B, K] (or None) -> s [b*K], loss [b], dL/ds [b, K] (fp32)."""
    K, b = spec.responses_per_prompt, g1 - g0
    dev = tok.device
    logps = torch.empty(b * K, dtype=torch.float32, device=dev)
    dlogps = torch.empty(b, K, dtype=torch.float32, device=dev)
    loss = torch.empty(b, dtype=torch.float32, device=dev)
    coef = margin_coefficients(spec, logps)
    ref_arg = ref.to(torch.float32).contiguous() if ref is not None and spec.needs_reference else logps
    launch(group_loss_launch(spec, tok, cu, counts, ref_arg, coef, g0, g1, logps, loss, dlogps))
    return logps, loss, dlogps


def group_loss_from_logps(spec: PreferenceSpec, logps, ref, lengths):
    """The same kernel on [B, K] log-probs (each response one 'token'): -> loss [B], dL/ds [B, K]."""
    B, K = logps.shape
    cu = torch.arange(B * K + 1, device=logps.device)
    counts = torch.ones(B * K, device=logps.device) if lengths is None else lengths.reshape(-1).contiguous()
    _, loss, dlogps = group_loss(spec, logps.detach().reshape(-1).float().contiguous(), cu, counts, ref, 0, B)
    return loss, dlogps
