"""Chunk schedule: which rows share one logits buffer (docs/method.md §4).

The loss splits by group, so the fused loss takes chunks of *whole groups* up to a token budget and
runs them in one pass. A group longer than the budget becomes a chunk of several row tiles, run in
two passes (log-probs first, then gradients with the logits recomputed), so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass


def row_tiles(start: int, end: int, size: int) -> tuple[tuple[int, int], ...]:
    """[start, end) cut into consecutive tiles of at most ``size`` rows."""
    return tuple((a, min(a + size, end)) for a in range(start, end, size))


@dataclass(frozen=True)
class GroupChunk:
    """Groups [g0, g1) over rows [t0, t1), computed in ``tiles`` (one tile: the single-pass path)."""

    g0: int
    g1: int
    t0: int
    t1: int
    tiles: tuple[tuple[int, int], ...]

    @property
    def single_pass(self) -> bool:
        return len(self.tiles) == 1


def plan_group_chunks(cu_seqlens: list[int], K: int, chunk_tokens: int) -> list[GroupChunk]:
    """Greedy: add whole groups to a chunk while its rows stay within ``chunk_tokens``."""
    B = (len(cu_seqlens) - 1) // K
    chunks, g0 = [], 0
    while g0 < B:
        t0, g1 = cu_seqlens[g0 * K], g0 + 1
        while g1 < B and cu_seqlens[(g1 + 1) * K] - t0 <= chunk_tokens:
            g1 += 1
        t1 = cu_seqlens[g1 * K]
        chunks.append(GroupChunk(g0, g1, t0, t1, row_tiles(t0, t1, chunk_tokens)))
        g0 = g1
    return chunks
