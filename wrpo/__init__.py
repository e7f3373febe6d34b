"""wrpo: the WRPO method on top of wrpo_kernels (alpha schedule; trainer and CLI to come)."""

from .schedule import ALPHA_SCHEDULES, alpha_at

__all__ = ["ALPHA_SCHEDULES", "alpha_at"]
