"""The validated inputs of an LM-head call, in the one form every backend takes (built by
``api.head_inputs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .packing import PackedRows

if TYPE_CHECKING:
    from .chunked.options import HeadOptions


class HeadInputs(NamedTuple):
    """Validated head inputs: packed ``hidden`` [N, H] and ``labels`` [N], the ``weight`` [V_r, H] and
    ``bias`` rows this rank holds (all of them, unless the head is sharded over the vocabulary, see
    :mod:`.vocab_parallel`), the layout ``rows`` and the head's ``opts``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    rows: PackedRows
    opts: HeadOptions
