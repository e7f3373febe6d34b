"""Logged metrics, named as the official WRPO trainer names them (docs/method.md §3).

All values are detached 0-dim tensors on the device of the inputs: no host synchronisation;
the caller decides when to read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .objective import PreferenceSpec, math_dtype, rewards
from .vocab_parallel import all_reduce

if TYPE_CHECKING:
    from .head_inputs import HeadInputs
    from .output import FusedLoss


def fused_loss_metrics(spec: PreferenceSpec, x: HeadInputs, out: FusedLoss, ref_logps, nll_weight) -> dict:
    """The metrics of :func:`~wrpo_kernels.fused_linear_wrpo_loss` from its validated inputs ``x`` and
    what the backend returned: :func:`reward_metrics`, :func:`mean_logit_metrics`, and ``nll_loss``
    (``out.nll``) when the loss has an NLL term."""
    B, K = out.logps.shape
    lengths = x.rows.counts.view(B, K).to(math_dtype(x.hidden.dtype))
    metrics = reward_metrics(spec, out.logps, ref_logps, lengths)
    valid = x.labels != x.opts.ignore_index
    metrics.update(
        mean_logit_metrics(spec, x.hidden, x.weight, x.bias, x.rows, valid=valid, shard=x.opts.shard)
    )
    if nll_weight:
        metrics["nll_loss"] = out.nll
    return metrics


def reward_metrics(spec: PreferenceSpec, logps, ref_logps, lengths) -> dict:
    """:func:`preference_metrics` of policy log-probs [B, K] and their implicit rewards against
    ``ref_logps`` [B, K] (None for simpo); ``lengths`` [B, K]: token counts (None where no reward
    divides by them)."""
    logps = logps.detach()
    return preference_metrics(spec, logps, rewards(spec, logps, ref_logps, lengths))


def preference_metrics(spec: PreferenceSpec, logps: torch.Tensor, rewards: torch.Tensor) -> dict:
    """Metrics from policy log-probs and implicit rewards, both [B, K].

    ``rewards/chosen`` is the weighted chosen reward ``sum_j w_j r_j``; ``source`` is the plain mean
    over the source responses (all chosen but the last), ``target`` the last chosen response.
    Accuracies compare against every rejected response (``pivot``: target vs rejected). The official
    trainer's ``rewards/pivot_accuracies`` broadcasts [B] against [B, 1] and so compares each target
    with the rejected responses of *every* prompt; here each target meets its own prompt's only.
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


@torch.no_grad()
def mean_logit_metrics(
    spec: PreferenceSpec, hidden, weight, bias, rows, valid=None, block: int = 4096, shard=None
) -> dict:
    """``logits/chosen``, ``logits/rejected``: the mean raw logit ``z = h W^T + b`` over the vocabulary
    and over the tokens of the chosen (resp. rejected) responses, as TRL's ``mean_logits``.

    ``mean_v z_tv = (h_t . sum_v W_v + sum_v b_v) / V``: one [H] vector, no logits. hidden [N, H]
    with ``rows`` (``PackedRows``: seq [N], counts [S]); ``valid`` [N] marks counted rows (None: all).
    ``shard``: the head's vocabulary shard (``vocab_parallel.VocabShard``), whose sums are added over
    its group (one all-reduce of H + 1 numbers).
    """
    md = math_dtype(hidden.dtype)
    w_sum = weight.detach().sum(0, dtype=md)
    b_sum = bias.detach().sum(dtype=md) if bias is not None else w_sum.new_zeros(())
    V = weight.shape[0]
    if shard is not None:
        both = all_reduce(torch.cat([w_sum, b_sum[None]]), torch.distributed.ReduceOp.SUM, shard.group)
        w_sum, b_sum, V = both[:-1], both[-1], shard.vocab
    h = hidden.detach()
    row_mean = torch.cat([(h[i : i + block].to(md) @ w_sum + b_sum) / V for i in range(0, h.shape[0], block)])
    if valid is not None:
        row_mean = row_mean * valid.to(md)
    K, C = spec.responses_per_prompt, spec.num_chosen
    S = rows.counts.numel()
    sums = torch.zeros(S, dtype=md, device=hidden.device).index_add_(0, rows.seq, row_mean).view(-1, K)
    counts = rows.counts.to(md).view(-1, K)
    return {
        "logits/chosen": sums[:, :C].sum() / counts[:, :C].sum(),
        "logits/rejected": sums[:, C:].sum() / counts[:, C:].sum(),
    }
