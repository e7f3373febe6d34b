"""The result type of the fused loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WRPOOutput:
    """``loss``: scalar, differentiable; ``metrics``: detached 0-dim tensors (names as in docs/method.md);
    ``logps``: [B, K] policy log-probs (fp32, or fp64 for fp64 inputs), detached."""

    loss: torch.Tensor
    metrics: dict
    logps: torch.Tensor
