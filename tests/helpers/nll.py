"""The fp64 oracle of ``fused_linear_nll_loss``: the mean NLL from the full logits."""

from __future__ import annotations

import torch

from .batches import IGNORE


def full_logits_nll(hidden, weight, bias, labels, *, softcap=None, temperature=1.0, num_tokens=None):
    """-(sum_t log softmax(logits_t)[label_t]) / n and per-token log-probs [N], from fp64 logits."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    valid = labels != IGNORE
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1) * valid
    n = valid.sum() if num_tokens is None else num_tokens
    return -picked.sum() / n, picked
