"""The chunk schedule and autograd functions shared by the chunked backends (docs/method.md §4).

A backend plugs in its row ops, an object of the :class:`RowOps` protocol (:mod:`.row_ops`): the
chunk's GEMM, per-row log-sum-exp and target logit, the in-place softmax gradient and the group loss.
"""

from ..objective import math_dtype
from .entry import on_labelled_rows, run_fused, run_logprobs, run_nll
from .fused_loss import FusedLinearWRPOFunction, FusedPlan
from .fused_nll import FusedLinearNLLFunction, NLLPlan
from .grads import HeadGrads
from .logprobs import LinearLogprobsFunction, LogprobPlan, reduce_token_logprobs
from .options import HeadOptions, default_chunk_tokens
from .preference_loss import PreferenceLossFunction
from .row_ops import RowOps
from .schedule import plan_group_chunks, row_tiles
from .targets import Targets

__all__ = [
    "FusedLinearNLLFunction",
    "FusedLinearWRPOFunction",
    "FusedPlan",
    "HeadGrads",
    "HeadOptions",
    "LinearLogprobsFunction",
    "LogprobPlan",
    "NLLPlan",
    "PreferenceLossFunction",
    "RowOps",
    "Targets",
    "default_chunk_tokens",
    "math_dtype",
    "on_labelled_rows",
    "plan_group_chunks",
    "reduce_token_logprobs",
    "row_tiles",
    "run_fused",
    "run_logprobs",
    "run_nll",
]
