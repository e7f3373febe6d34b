"""The denominators of a batch's means, as one value from the trainer down to the chunk plans."""

from __future__ import annotations

from typing import NamedTuple

import torch

# The keywords the public functions took before ``totals``, still accepted: alias -> field.
ALIASES = {"num_groups": "groups", "num_nll_tokens": "tokens", "num_tokens": "tokens"}


class Totals(NamedTuple):
    """The denominators of a batch's means: ``groups`` for the mean group loss, ``tokens`` for the NLL
    term's mean (the first chosen response's labelled tokens in the preference loss; every labelled
    token in SFT, which has no group loss and does not read ``groups``).

    Each is a positive number, a 1-element tensor, or None: this call's own count. Under gradient
    accumulation or data parallelism pass the whole optimizer step's counts (over the number of
    processes when they average gradients): the micro-batch losses then sum to the batch's loss,
    ``sum_m L_m = sum_groups loss_g / groups - nll_weight * sum_tokens log p / tokens``, and so do their
    gradients.
    """

    groups: float | torch.Tensor | None = None
    tokens: float | torch.Tensor | None = None

    def as_tensors(self, dtype: torch.dtype, device: torch.device) -> Totals:
        """Each count as a 0-dim ``dtype`` tensor on ``device`` (detached; None stays None)."""
        return Totals(*(None if v is None else _as_tensor(v, dtype, device) for v in self))


def _as_tensor(value, dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(value), dtype=dtype, device=device)


def check_count(name: str, value) -> None:
    """Refuse a denominator that is neither None, a positive number nor a 1-element tensor. A tensor's
    value is not read: that would wait for the device."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number (or a tensor), got {value!r}")


def resolve_totals(totals: Totals | None, **aliases) -> Totals:
    """The checked :class:`Totals` of a call given ``totals=`` or the alias keywords (:data:`ALIASES`),
    not both; an error names the keyword the bad value came in."""
    given = [name for name, value in aliases.items() if value is not None]
    if totals is None:
        fields = {ALIASES[name]: aliases[name] for name in given}
        for name in given:
            check_count(name, aliases[name])
        return Totals(**fields)
    if given:
        raise ValueError(f"pass the denominators either as totals= or as {' / '.join(given)}=, not both")
    if not isinstance(totals, Totals):
        raise ValueError(f"totals must be a wrpo_kernels.Totals, got {type(totals).__name__}")
    for field, value in totals._asdict().items():
        check_count(f"totals.{field}", value)
    return totals


OWN_COUNTS = Totals()  # every mean over this call's own groups and tokens
