"""The chunk schedule of the chunked backends (docs/method.md §4): wrpo_kernels/chunked/schedule.py."""

from __future__ import annotations

from itertools import pairwise

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wrpo_kernels.chunked.schedule import plan_group_chunks, row_tiles


def check_plan(cu, K, budget):
    chunks = plan_group_chunks(cu, K, budget)
    B = (len(cu) - 1) // K
    # covers every group exactly once, in order, with contiguous groups and tokens
    assert chunks[0].g0 == 0 and chunks[-1].g1 == B
    for prev, nxt in pairwise(chunks):
        assert prev.g1 == nxt.g0
        assert prev.t1 == nxt.t0
    for c in chunks:
        assert c.g0 < c.g1
        assert c.t0 == cu[c.g0 * K] and c.t1 == cu[c.g1 * K]
        rows = c.t1 - c.t0
        if c.g1 - c.g0 > 1:
            assert rows <= budget, "a chunk of several groups must fit the budget"
        # tiles: contiguous, cover [t0, t1), each within the budget
        assert c.tiles[0][0] == c.t0 and c.tiles[-1][1] == c.t1
        for (_, b0), (a1, _) in pairwise(c.tiles):
            assert b0 == a1
        assert all(0 < b - a <= budget for a, b in c.tiles)
        assert c.single_pass == (rows <= budget)
    # greedy: the next group would not have fit in the previous chunk
    for prev in chunks[:-1]:
        assert cu[(prev.g1 + 1) * K] - prev.t0 > budget
    return chunks


def cu_from_lengths(lengths):
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def test_plan_packs_several_groups_per_chunk():
    cu = cu_from_lengths([2, 3, 1, 4, 2, 2, 1, 1, 1])  # K=3: groups of 6, 8, 3 tokens
    chunks = check_plan(cu, 3, 14)
    assert [(c.g0, c.g1) for c in chunks] == [(0, 2), (2, 3)]
    assert all(c.single_pass for c in chunks)


def test_plan_oversize_group_gets_tiles():
    cu = cu_from_lengths([5, 6, 4, 1, 1, 1])  # K=3: groups of 15 and 3 tokens
    chunks = check_plan(cu, 3, 4)
    assert [(c.g0, c.g1) for c in chunks] == [(0, 1), (1, 2)]
    assert chunks[0].tiles == ((0, 4), (4, 8), (8, 12), (12, 15))
    assert not chunks[0].single_pass and chunks[1].single_pass


def test_plan_exact_fit_is_one_chunk():
    cu = cu_from_lengths([2, 2, 3, 3])  # K=2: groups of 4 and 6
    assert [(c.g0, c.g1) for c in check_plan(cu, 2, 10)] == [(0, 2)]
    assert [(c.g0, c.g1) for c in check_plan(cu, 2, 9)] == [(0, 1), (1, 2)]


def test_row_tiles_cover_range():
    assert row_tiles(3, 10, 3) == ((3, 6), (6, 9), (9, 10))
    assert row_tiles(0, 4, 10) == ((0, 4),)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    K=st.integers(2, 4),
    lengths=st.lists(st.integers(1, 9), min_size=2, max_size=24),
    budget=st.integers(1, 40),
)
def test_plan_properties_randomized(K, lengths, budget):
    lengths = lengths[: len(lengths) // K * K] or [1] * K
    check_plan(cu_from_lengths(lengths), K, budget)
