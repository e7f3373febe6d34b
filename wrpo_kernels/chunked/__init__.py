"""The chunk schedule and autograd functions shared by the chunked backends (docs/method.md §4).

A backend plugs in its *row ops*, an object with:
  workspace(rows, V, dtype, device, softcap_grad)   buffers for one chunk of logits
  logits(ws, hidden, weight, bias, opts, for_grad)  the chunk's GEMM (+ what the row work needs) -> state
  stats(state, safe_labels, opts) -> lse, target    per row, fp32
  grad(state, safe_labels, scale, lse, opts)         in-place dL/dx [n, V] (any strides), dL/d(log p) = scale
  lowp(ws, n)                                        a buffer in the input dtype for the gradient GEMMs
  group_loss(spec, tok, targets, chunk, ref, lengths) -> s, loss per group, dL/ds (for the chunk's
                                                     groups; ref and lengths are the whole batch's [B, K])
"""

from .entry import run_fused, run_logprobs
from .fused_loss import FusedLinearWRPOFunction, FusedPlan
from .grads import HeadGrads
from .logprobs import LinearLogprobsFunction, LogprobPlan, reduce_token_logprobs
from .options import HeadOptions, default_chunk_tokens, math_dtype
from .schedule import plan_group_chunks, row_tiles
from .targets import Targets

__all__ = [
    "FusedLinearWRPOFunction",
    "FusedPlan",
    "HeadGrads",
    "HeadOptions",
    "LinearLogprobsFunction",
    "LogprobPlan",
    "Targets",
    "default_chunk_tokens",
    "math_dtype",
    "plan_group_chunks",
    "reduce_token_logprobs",
    "row_tiles",
    "run_fused",
    "run_logprobs",
]
