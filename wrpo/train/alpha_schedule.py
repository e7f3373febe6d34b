"""The fusion coefficient's schedule ("progressive adaptation" of the WRPO paper)."""

from __future__ import annotations

ALPHA_SCHEDULES = ("linear", "linear_full", "constant")


def alpha_at(step: int, total_steps: int, *, alpha: float, schedule: str = "linear") -> float:
    """alpha at optimizer step ``step`` (0-based: the global step before the update) of ``total_steps``.

    linear: ``alpha * step / total_steps``, as the official WRPO trainer's ``LinearDecayScheduler``:
    0 at the first step, ``alpha`` reached only after the last (an evaluation at the end sees it);
    linear_full: ``alpha * step / (total_steps - 1)``, 0 at the first step and ``alpha`` at the last;
    constant: ``alpha`` throughout.
    """
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha schedule {schedule!r} is not one of {ALPHA_SCHEDULES}")
    if total_steps < 1 or not step >= 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    if schedule == "constant":
        return float(alpha)
    if schedule == "linear":
        return float(alpha) * min(step, total_steps) / total_steps
    if total_steps == 1:
        return float(alpha)
    return float(alpha) * min(step, total_steps - 1) / (total_steps - 1)
