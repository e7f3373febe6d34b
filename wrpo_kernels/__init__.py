"""wrpo-kernels: fused, memory-lean LM-head losses for WRPO, DPO, SimPO and IPO.

Public API (docs/method.md §2): :func:`linear_logprobs`, :func:`fused_linear_wrpo_loss`, :func:`wrpo_loss`,
:func:`fused_linear_nll_loss` (SFT), the modules :class:`LinearLogprobs`, :class:`FusedLinearWRPOLoss`, and
:class:`Totals`, the denominators of the means under gradient accumulation.
"""

from .api import BACKENDS, fused_linear_nll_loss, fused_linear_wrpo_loss, linear_logprobs, wrpo_loss
from .modules import FusedLinearWRPOLoss, LinearLogprobs
from .objective import LOSS_TYPES, default_chosen_weights
from .output import WRPOOutput
from .totals import Totals

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LOSS_TYPES",
    "FusedLinearWRPOLoss",
    "LinearLogprobs",
    "Totals",
    "WRPOOutput",
    "default_chosen_weights",
    "fused_linear_nll_loss",
    "fused_linear_wrpo_loss",
    "linear_logprobs",
    "wrpo_loss",
]
