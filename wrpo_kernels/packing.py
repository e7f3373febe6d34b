"""Packed-row bookkeeping: which sequence each token belongs to, and per-sequence sums.

Packed layout (DESIGN §3): the S = B*K sequences lie back to back in N rows, group-major;
``cu_seqlens`` [S+1] holds their bounds, ``cu_seqlens[0] = 0`` and ``cu_seqlens[S] = N``.
"""

from __future__ import annotations

import torch


def sequence_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """seq [N] (int64): the index of the sequence that holds each token."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=num_tokens)


def segment_sum(values: torch.Tensor, seq: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[s] = sum of ``values[t]`` over tokens t with ``seq[t] == s`` ([N] -> [S])."""
    out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out.index_add_(0, seq, values)


def padded_to_packed(hidden: torch.Tensor, labels: torch.Tensor):
    """[S, T, H], [S, T] (one sequence per row, padding marked in labels) -> [S*T, H], [S*T], cu [S+1].

    Padding rows stay in place: their labels are ignored, so they add nothing to any sum.
    """
    S, T = labels.shape
    cu = torch.arange(0, (S + 1) * T, T, device=labels.device, dtype=torch.int64)
    return hidden.reshape(S * T, hidden.shape[-1]), labels.reshape(S * T), cu
