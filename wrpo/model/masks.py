"""Dense additive attention masks for packed rows, for attention implementations (sdpa, eager) that do
not separate packed sequences by ``position_ids`` alone (docs/method.md §5)."""

from __future__ import annotations

import torch


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, L] position ids restarting per sequence -> additive mask [R, 1, L, L]: 0 where token i may
    attend to j (same sequence, j <= i), the dtype's minimum elsewhere. For sdpa/eager attention,
    which do not separate packed sequences by position ids alone (docs/method.md §5)."""
    seq = torch.cumsum((position_ids == 0).to(torch.int64), 1)
    idx = torch.arange(position_ids.shape[1], device=position_ids.device)
    allowed = (seq[:, :, None] == seq[:, None, :]) & (idx[None, None, :] <= idx[None, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def shared_prefix_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense additive mask [R, 1, L, L] of shared-prefix rows (``wrpo.data.collate.pack_shared_prefix``),
    for sdpa/eager attention: token i may attend to j <= i of its own stretch (where positions run on by
    one), and a response to the first ``position_ids[start]`` tokens of its group (the prompt)."""
    R, L = position_ids.shape
    dev = position_ids.device
    idx = torch.arange(L, device=dev)
    prev = torch.cat([position_ids.new_full((R, 1), -2), position_ids[:, :-1]], 1)
    stretch_start = (position_ids != prev + 1) | (idx == 0)
    group_start = (position_ids == 0) | (idx == 0)
    stretch = torch.cumsum(stretch_start.to(torch.int64), 1)
    group = torch.cumsum(group_start.to(torch.int64), 1)
    # where a token's group starts, and how long the prefix its stretch shares is
    g0 = torch.cummax(torch.where(group_start, idx, 0), 1).values
    shared = torch.where(stretch_start & ~group_start, position_ids, 0)
    s0 = torch.cummax(torch.where(stretch_start, idx, 0), 1).values
    plen = shared.gather(1, s0)
    causal = idx[None, None, :] <= idx[None, :, None]
    same_stretch = stretch[:, :, None] == stretch[:, None, :]
    in_prefix = (group[:, :, None] == group[:, None, :]) & (idx[None, None, :] < (g0 + plen)[:, :, None])
    allowed = causal & (same_stretch | in_prefix)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
