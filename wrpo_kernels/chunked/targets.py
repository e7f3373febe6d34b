"""The labels of packed rows, prepared once per call for every chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objective import math_dtype


@dataclass(frozen=True)
class Targets:
    """safe [N] int64 (ignored -> 0), valid [N] 1/0 in the math dtype, seq [N] sequence of each
    token, counts [S] int64 valid tokens per sequence, cu [S+1] int64 sequence bounds."""

    safe: torch.Tensor
    valid: torch.Tensor
    seq: torch.Tensor
    counts: torch.Tensor
    cu: torch.Tensor

    @classmethod
    def build(cls, labels, rows, ignore_index: int, dtype: torch.dtype) -> Targets:
        """``rows``: the validated layout (``packing.PackedRows``: cu, seq, counts)."""
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0).to(torch.int64)
        return cls(safe, valid.to(math_dtype(dtype)), rows.seq, rows.counts, rows.cu)
