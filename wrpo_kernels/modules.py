"""``nn.Module`` wrappers of the fused calls, for trainers that hold loss modules.

Options are attributes, so a trainer can move them between steps (``loss_fn.alpha = cur_alpha``).
The head's weight (and bias) are passed at call time, as in Liger's fused-linear losses.
"""

from __future__ import annotations

import inspect

from torch import nn

from .api import fused_linear_wrpo_loss, linear_logprobs
from .output import WRPOOutput


def _keyword_defaults(fn, skip=()):
    sig = inspect.signature(fn)
    return {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and n not in skip}


class _FusedHead(nn.Module):
    """Holds the keyword-only options of ``_fn`` (minus per-call tensors) as attributes."""

    _fn = None
    _per_call = ("bias",)

    def __init__(self, **options):
        super().__init__()
        defaults = _keyword_defaults(type(self)._fn, self._per_call)
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown options {sorted(unknown)}; known: {sorted(defaults)}"
            )
        self._option_names = tuple(defaults)
        for name, default in defaults.items():
            setattr(self, name, options.get(name, default))

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class FusedLinearWRPOLoss(_FusedHead):
    """``forward(hidden, weight, labels, cu_seqlens, ref_logps=None, bias=None)`` -> :class:`WRPOOutput`.

    Options: those of :func:`~wrpo_kernels.fused_linear_wrpo_loss` (responses_per_prompt, num_chosen,
    alpha, chosen_weights, loss_type, beta, gamma, label_smoothing, logp_reduction, nll_weight,
    ignore_index, softcap, temperature, backend, chunk_tokens). ``totals`` (gradient accumulation; or its
    aliases ``num_groups`` / ``num_nll_tokens``) is per call, like ``ref_logps``.
    """

    _fn = staticmethod(fused_linear_wrpo_loss)
    _per_call = ("bias", "ref_logps", "totals", "num_groups", "num_nll_tokens")

    def forward(
        self, hidden, weight, labels, cu_seqlens=None, ref_logps=None, bias=None, *, totals=None, **aliases
    ) -> WRPOOutput:
        """``aliases``: ``num_groups`` / ``num_nll_tokens``, the older spelling of ``totals``."""
        unknown = set(aliases) - {"num_groups", "num_nll_tokens"}
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unknown keywords {sorted(unknown)}")
        head = {"ref_logps": ref_logps, "bias": bias, "totals": totals}
        return fused_linear_wrpo_loss(hidden, weight, labels, cu_seqlens, **head, **aliases, **self.options())


class LinearLogprobs(_FusedHead):
    """``forward(hidden, weight, labels, cu_seqlens=None, bias=None)`` -> log-probs, as
    :func:`~wrpo_kernels.linear_logprobs` (options: ignore_index, softcap, temperature, reduction,
    backend, chunk_tokens)."""

    _fn = staticmethod(linear_logprobs)

    def forward(self, hidden, weight, labels, cu_seqlens=None, bias=None):
        return linear_logprobs(hidden, weight, labels, cu_seqlens, bias=bias, **self.options())
