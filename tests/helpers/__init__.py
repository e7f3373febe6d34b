"""Helpers shared by the tests (``from helpers import make_batch, ...``; ``tests/`` is on pytest's
``pythonpath``): random packed batches, error measures, the fused-loss runner."""

from .batches import (
    IGNORE,
    Batch,
    group_tokens,
    make_batch,
    preference_inputs,
    random_groups,
    resolve_chunk,
    same_size_groups,
)
from .errors import assert_rel_close, largest_allocation, max_rel_err, rel_norm_err
from .fused import METRIC_NAMES, check_all_close, fused

__all__ = [
    "IGNORE",
    "METRIC_NAMES",
    "Batch",
    "assert_rel_close",
    "check_all_close",
    "fused",
    "group_tokens",
    "largest_allocation",
    "make_batch",
    "max_rel_err",
    "preference_inputs",
    "random_groups",
    "rel_norm_err",
    "resolve_chunk",
    "same_size_groups",
]
