"""Logged metrics, named as the official WRPO trainer names them (DESIGN §2).

All values are detached 0-dim tensors on the device of the inputs: no host synchronisation;
the caller decides when to read them.
"""

from __future__ import annotations

import torch

from .objective import PreferenceSpec


def preference_metrics(spec: PreferenceSpec, logps: torch.Tensor, rewards: torch.Tensor) -> dict:
    """Metrics from policy log-probs and implicit rewards, both [B, K].

    ``rewards/chosen`` is the weighted chosen reward ``sum_j w_j r_j``; ``source`` is the plain mean
    over the source responses (all chosen but the last), ``target`` the last chosen response.
    Accuracies compare against every rejected response (``pivot``: target vs rejected).
    """
    logps, rewards = logps.detach(), rewards.detach()
    C = spec.num_chosen
    w = torch.tensor(spec.chosen_weights, dtype=rewards.dtype, device=rewards.device)
    chosen = rewards[:, :C] @ w
    target = rewards[:, C - 1]
    rejected = rewards[:, C:]

    def beats(x):  # fraction of (group, rejected response) pairs where x wins
        return (x[:, None] > rejected).to(rewards.dtype).mean()

    m = {
        "rewards/chosen": chosen.mean(),
        "rewards/target_chosen": target.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": beats(chosen),
        "rewards/pivot_accuracies": beats(target),
        "rewards/margins": (chosen - rejected.mean(1)).mean(),
        "logps/chosen": logps[:, :C].mean(),
        "logps/target_chosen": logps[:, C - 1].mean(),
        "logps/rejected": logps[:, C:].mean(),
        "cur_alpha": 1.0 - w[-1],
    }
    if C > 1:
        source = rewards[:, : C - 1].mean(1)
        m["rewards/source_chosen"] = source.mean()
        m["rewards/source_accuracies"] = beats(source)
        m["logps/source_chosen"] = logps[:, : C - 1].mean()
    return m
