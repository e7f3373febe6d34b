"""The result types of the fused preference loss: a backend's (:class:`FusedLoss`) and the public one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class FusedLoss(NamedTuple):
    """What a backend's fused preference loss returns: ``loss`` (0-dim, differentiable), the policy
    ``logps`` [B, K] and ``nll`` (0-dim), the mean NLL over this call's first-chosen tokens, whatever
    ``totals`` the loss divides by (the logged ``nll_loss``). logps and nll: detached, math dtype."""

    loss: torch.Tensor
    logps: torch.Tensor
    nll: torch.Tensor


@dataclass
class WRPOOutput:
    """``loss``: scalar, differentiable; ``metrics``: detached 0-dim tensors (names as in docs/method.md);
    ``logps``: [B, K] policy log-probs (fp32, or fp64 for fp64 inputs), detached."""

    loss: torch.Tensor
    metrics: dict
    logps: torch.Tensor
