"""Packed-row bookkeeping: which sequence each token belongs to, and per-sequence sums.

Packed layout (docs/method.md §2): the S = B*K sequences lie back to back in N rows, group-major;
``cu_seqlens`` [S+1] holds their bounds, ``cu_seqlens[0] = 0`` and ``cu_seqlens[S] = N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass(frozen=True)
class PackedRows:
    """Validated sequence layout: cu_seqlens [S+1] on the device and on the host, seq [N] the sequence of
    each row, counts [S] (int64) valid labels per sequence and the same counts on the host."""

    cu: torch.Tensor
    cu_host: list
    seq: torch.Tensor
    counts: torch.Tensor
    counts_host: list


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


def keep_labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, rows: PackedRows, ignore_index: int):
    """Drop the rows whose label is ``ignore_index`` (prompt tokens, padding) before the LM head.

    Their logits never enter a log-prob, so the head's GEMMs and row work need only the labelled
    rows: n = sum(counts) of N. Returns (hidden [n, H], labels [n], rows of the compact layout,
    index [n] of the kept rows in the input), or the inputs and ``None`` when nothing would be
    dropped. No host synchronisation: n comes from ``rows.counts_host``. Gradients flow back through
    ``index_select`` (zero for dropped rows, which the loss does not depend on).
    """
    N, n = labels.shape[0], sum(rows.counts_host)
    if n in (0, N):
        return hidden, labels, rows, None
    index = torch.argsort((labels == ignore_index).to(torch.uint8), stable=True)[
        :n
    ]  # labelled rows, in order
    cu_host = [0, *accumulate(rows.counts_host)]
    cu = torch.tensor(cu_host, dtype=torch.int64).to(labels.device, non_blocking=True)
    compact = PackedRows(cu, cu_host, sequence_ids(cu, n), rows.counts, rows.counts_host)
    return hidden.index_select(0, index), labels.index_select(0, index), compact, index


def scatter_rows(values: torch.Tensor, index: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """Per-row values of the kept rows [n] back to all rows [N], zero where a row was dropped."""
    if index is None:
        return values
    return values.new_zeros(num_rows).index_add(0, index, values)
