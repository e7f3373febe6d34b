"""The fusion coefficient's schedule ("progressive adaptation", DESIGN §1)."""

from __future__ import annotations

ALPHA_SCHEDULES = ("linear", "constant")


def alpha_at(step: int, total_steps: int, *, alpha: float, schedule: str = "linear") -> float:
    """alpha at optimizer step ``step`` (0-based) of ``total_steps``.

    linear: ``alpha * step / (total_steps - 1)``, 0 at the first step and ``alpha`` at the last
    (the paper's); constant: ``alpha`` throughout.
    """
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha schedule {schedule!r} is not one of {ALPHA_SCHEDULES}")
    if total_steps < 1 or not step >= 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    if schedule == "constant" or total_steps == 1:
        return float(alpha)
    return float(alpha) * min(step, total_steps - 1) / (total_steps - 1)
