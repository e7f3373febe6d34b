"""The WRPO objective on per-sequence log-probs, with its analytic gradient (docs/method.md §3).

A group is one prompt with K responses: ``num_chosen`` chosen ones (sources first, target last)
then ``K - num_chosen`` rejected ones. For log-probs ``s`` [B, K] (summed over response tokens):

    r_k = c_k * (s_k - s_ref_k)        c = beta (dpo) | beta / n (simpo, s_ref = 0) | 1 / n (ipo)
    m   = sum_j w_j r_j - mean_{k rejected} r_k - gamma
    L   = -(1 - eps) log sigmoid(m) - eps log sigmoid(-m)      (dpo, simpo)
        | (m - 1 / (2 beta))^2                                   (ipo)

and dL/ds_k = dL/dm * a_k * c_k with a = [w_1..w_C, -1/R, ..., -1/R].

With ``logp_reduction="mean"``, ``s`` (and ``s_ref``) are per-token means ``sum / n`` instead: dpo
becomes length-normalised, and simpo and ipo, already per token, drop their 1/n (c = beta | 1), so
that their rewards and loss are those of ``"sum"`` (with ``s_ref`` averaged too).

The arithmetic runs in fp32 (fp64 for fp64 log-probs) whatever the dtype of the log-probs: bf16 log-probs
are upcast, and the token counts n are never rounded to bf16 (which holds integers exactly only up to 256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "simpo", "ipo")
LOGP_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class PreferenceSpec:
    """Everything the group loss needs besides the log-probs. Build it with :func:`make_spec`."""

    responses_per_prompt: int
    num_chosen: int
    chosen_weights: tuple[float, ...]
    loss_type: str = "dpo"
    beta: float = 0.01
    gamma: float = 0.0
    label_smoothing: float = 0.0
    logp_reduction: str = "sum"  # what s is: the sum over a response's tokens, or their mean

    @property
    def num_rejected(self) -> int:
        return self.responses_per_prompt - self.num_chosen

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    @property
    def length_normalised(self) -> bool:
        """Whether the loss is defined on per-token log-probs (simpo, ipo): summed ones need the counts."""
        return self.loss_type in ("simpo", "ipo")

    @property
    def logps_are_means(self) -> bool:
        """Whether s is a response's mean log-prob (``logp_reduction="mean"``) rather than its sum: the
        one place that reads ``logp_reduction``; the rules below, and the backends, ask this."""
        return self.logp_reduction == "mean"

    @property
    def divides_by_length(self) -> bool:
        """Whether c holds 1/n: a length-normalised loss on summed log-probs (means already are per token)."""
        return self.length_normalised and not self.logps_are_means


def default_chosen_weights(num_chosen: int, alpha: float) -> tuple[float, ...]:
    """``[alpha / (C-1)] * (C-1) + [1 - alpha]``: the sources share alpha, the target gets the rest.

    For the paper's K = 3 (one source, one target) this is ``[alpha, 1 - alpha]``.
    """
    if num_chosen == 1:
        return (1.0,)
    return (alpha / (num_chosen - 1),) * (num_chosen - 1) + (1.0 - alpha,)


def make_spec(
    *,
    responses_per_prompt: int,
    num_chosen: int,
    alpha: float = 0.1,
    chosen_weights=None,
    loss_type: str = "dpo",
    beta: float = 0.01,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    logp_reduction: str = "sum",
) -> PreferenceSpec:
    """Validate the options of the loss and return a :class:`PreferenceSpec` (defaults: those of
    :func:`~wrpo_kernels.fused_linear_wrpo_loss`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if logp_reduction not in LOGP_REDUCTIONS:
        raise ValueError(f"logp_reduction={logp_reduction!r} is not one of {LOGP_REDUCTIONS}")
    K = responses_per_prompt
    if not isinstance(K, int) or K < 2:
        raise ValueError(f"responses_per_prompt must be an int >= 2, got {K!r}")
    if not isinstance(num_chosen, int) or not 1 <= num_chosen < K:
        raise ValueError(f"num_chosen must be an int in [1, {K - 1}] for {K} responses, got {num_chosen!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type == "ipo":
        raise ValueError("label_smoothing applies to the sigmoid losses (dpo, simpo), not to ipo")
    if chosen_weights is None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        weights = default_chosen_weights(num_chosen, float(alpha))
    else:
        weights = tuple(float(w) for w in chosen_weights)
        if len(weights) != num_chosen:
            raise ValueError(f"chosen_weights has {len(weights)} entries but num_chosen={num_chosen}")
        if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
            raise ValueError(f"chosen_weights must sum to 1, got {weights} (sum {sum(weights)})")
    return PreferenceSpec(
        K, num_chosen, weights, loss_type, float(beta), float(gamma), float(label_smoothing), logp_reduction
    )


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every sum and loss is computed in, for inputs of ``dtype``: fp64 stays fp64, anything
    else (fp32, bf16, fp16) accumulates in fp32, so that bf16 never rounds a sum or a token count."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reward_coefficients(spec: PreferenceSpec, lengths: torch.Tensor | None, like: torch.Tensor):
    """c in r = c * (s - s_ref): ``beta / n`` (simpo) or ``1 / n`` (ipo) [B, K] on summed log-probs,
    else a scalar tensor: beta (dpo; simpo on means) or 1 (ipo on means).

    In the math dtype of ``like`` (:func:`math_dtype`): counts above 256 stay exact for bf16 log-probs.
    """
    dt = math_dtype(like.dtype)
    base = 1.0 if spec.loss_type == "ipo" else spec.beta
    if not spec.divides_by_length:
        return torch.tensor(base, dtype=dt, device=like.device)
    return base / lengths.to(dt)


def token_span(spec: PreferenceSpec, lengths: torch.Tensor) -> torch.Tensor:
    """Tokens per unit of s [B, K]: n for means (``sum = s * n``), 1 for sums. The NLL term needs the sums."""
    return lengths if spec.logps_are_means else torch.ones_like(lengths)


def margin_coefficients(spec: PreferenceSpec, like: torch.Tensor) -> torch.Tensor:
    """a [K] with m = r @ a - gamma: the chosen weights, then -1/R for each rejected response."""
    a = list(spec.chosen_weights) + [-1.0 / spec.num_rejected] * spec.num_rejected
    return torch.tensor(a, dtype=like.dtype, device=like.device)


def _upcast(logps, ref_logps):
    md = math_dtype(logps.dtype)
    return logps.to(md), None if ref_logps is None else ref_logps.to(md)


def rewards(spec: PreferenceSpec, logps, ref_logps, lengths) -> torch.Tensor:
    """Implicit rewards r [B, K] in the math dtype; ``ref_logps`` is ignored for simpo."""
    logps, ref_logps = _upcast(logps, ref_logps)
    c = reward_coefficients(spec, lengths, logps)
    delta = logps if not spec.needs_reference else logps - ref_logps
    return c * delta


def group_loss_and_grad(spec: PreferenceSpec, logps, ref_logps, lengths):
    """Per-group loss L [B] and its gradient dL/ds [B, K] w.r.t. the policy log-probs ``s``, both in the
    math dtype (fp32; fp64 for fp64 log-probs)."""
    logps, ref_logps = _upcast(logps, ref_logps)
    c = reward_coefficients(spec, lengths, logps)
    a = margin_coefficients(spec, logps)
    r = c * (logps if not spec.needs_reference else logps - ref_logps)
    m = r @ a - spec.gamma
    if spec.loss_type == "ipo":
        d = m - 1.0 / (2.0 * spec.beta)
        loss, dloss_dm = d * d, 2.0 * d
    else:
        eps = spec.label_smoothing
        loss = -(1.0 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)
        dloss_dm = -(1.0 - eps) * torch.sigmoid(-m) + eps * torch.sigmoid(m)
    return loss, dloss_dm[:, None] * a * c
