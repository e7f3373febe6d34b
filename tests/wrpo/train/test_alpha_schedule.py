"""The alpha schedule ("progressive adaptation", docs/method.md §3): wrpo/train/alpha_schedule.py."""

from __future__ import annotations

from itertools import pairwise

import pytest

from wrpo import ALPHA_SCHEDULES, alpha_at


@pytest.mark.parametrize("total", [1, 2, 3, 10, 1001])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_linear_alpha_follows_the_official_schedule(total, alpha):
    """alpha * g / N at global step g of N (official LinearDecayScheduler): 0 at the first step,
    alpha * (N - 1) / N at the last, alpha only at an evaluation after it (g = N)."""
    values = [alpha_at(g, total, alpha=alpha, schedule="linear") for g in range(total + 1)]
    assert values[0] == 0.0
    assert values[-1] == pytest.approx(alpha, rel=1e-15)
    for g, v in enumerate(values):
        assert v == pytest.approx(alpha * g / total, rel=1e-12, abs=1e-15)
    assert all(b - a == pytest.approx(alpha / total, rel=1e-9) for a, b in pairwise(values))


@pytest.mark.parametrize("total", [2, 3, 10, 1001])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_linear_full_alpha_rises_from_zero_to_alpha_at_the_last_step(total, alpha):
    values = [alpha_at(s, total, alpha=alpha, schedule="linear_full") for s in range(total)]
    assert values[0] == 0.0
    assert values[-1] == pytest.approx(alpha, rel=1e-15)
    for s, v in enumerate(values):  # linear in between
        assert v == pytest.approx(alpha * s / (total - 1), rel=1e-12, abs=1e-15)


def test_linear_is_the_default_schedule():
    assert alpha_at(0, 10, alpha=0.1) == 0.0
    assert alpha_at(5, 10, alpha=0.1) == pytest.approx(0.05)


def test_linear_alpha_single_step_and_past_the_end():
    assert alpha_at(0, 1, alpha=0.3) == 0.0
    assert alpha_at(0, 1, alpha=0.3, schedule="linear_full") == pytest.approx(0.3)
    for schedule in ("linear", "linear_full"):
        assert alpha_at(50, 10, alpha=0.3, schedule=schedule) == pytest.approx(0.3)  # clamped


@pytest.mark.parametrize("step", [0, 1, 7, 99])
def test_constant_alpha_is_alpha_throughout(step):
    assert alpha_at(step, 100, alpha=0.1, schedule="constant") == pytest.approx(0.1)


def test_known_schedules():
    assert set(ALPHA_SCHEDULES) == {"linear", "linear_full", "constant"}


@pytest.mark.parametrize("name", ["cosine!", "Linear", ""])
def test_unknown_schedule_raises(name):
    with pytest.raises(ValueError, match=r"alpha schedule .* is not one of"):
        alpha_at(0, 10, alpha=0.1, schedule=name)


@pytest.mark.parametrize(("step", "total"), [(-1, 10), (0, 0)])
def test_bad_steps_raise(step, total):
    with pytest.raises(ValueError, match=r"total_steps >= 1 and step >= 0"):
        alpha_at(step, total, alpha=0.1)
