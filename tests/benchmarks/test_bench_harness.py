"""benchmarks/harness.py and records.py: the interleaved rounds, paired ratios and JSON writes that every
benchmark script shares (no timing of real work: fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import harness  # noqa: E402
import records  # noqa: E402


def test_rounds_rotate_by_one_method_each_round():
    names = ["a", "b", "c"]
    assert [harness.rotated(names, r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert harness.rotated([], 3) == []


def test_interleaved_runs_every_method_once_a_round_and_drops_one_that_raises():
    order = []

    def call(name, fail_at=None):
        def run():
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise ValueError(f"{name} broke")

        return run

    logged = []
    rounds = harness.interleaved(
        {"a": call("a"), "b": call("b", fail_at=2), "c": call("c")}, 3, log=logged.append
    )
    # round 0: a b c; round 1: b (raises) c a; round 2: c a (b left out)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a"]
    assert set(rounds.wall) == set(rounds.cpu) == {"a", "c"}
    assert all(len(rounds.wall[m]) == 3 and min(rounds.wall[m]) >= 0 for m in ("a", "c"))
    assert rounds.errors == {"b": "ValueError: b broke"} and logged == ["error in b: ValueError: b broke"]


def test_paired_ratios_pair_the_same_rounds():
    assert harness.paired_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == [2.0, 1.0, 4.0]
    with pytest.raises(ValueError):
        harness.paired_ratios([1.0], [1.0, 2.0])


def test_peak_rss_rise_sees_an_allocation():
    def allocate():
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        return block

    assert harness.peak_rss_rise_mb(allocate) > 32


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "deep" / "result.json"
    records.write_json(path, {"a": 1})
    records.write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
