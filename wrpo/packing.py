"""Batches of preference groups: packed into one padding-free row, or padded (DESIGN §3, issue 4).

A sequence is prompt + one response. Labels are shifted for the fused loss: the hidden state at
position t predicts token t+1, so ``labels[t] = ids[t+1]`` where t+1 is a response token, else
-100. Packed: every sequence of every group back to back in one row [1, L], position ids restarting
at 0 per sequence, ``cu_seqlens`` [S+1] marking the bounds. Padded: one sequence per row [S, T].
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def sequence_with_labels(prompt_ids, response_ids) -> tuple[list[int], list[int]]:
    """ids = prompt + response; labels[t] = ids[t+1] for response tokens, -100 elsewhere (shifted)."""
    ids = list(prompt_ids) + list(response_ids)
    start = len(prompt_ids)
    labels = [ids[t + 1] if t + 1 >= start else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


def _sequences(features):
    for f in features:
        for response in f["responses"]:
            yield sequence_with_labels(f["prompt_ids"], response)


def pack_groups(features) -> dict:
    """Groups [{prompt_ids, responses[K], num_chosen, ref_logps?}] -> one row: input_ids, position_ids,
    labels [1, L], cu_seqlens [S+1] (int64) and, if present, ref_logps [B, K]."""
    input_ids, labels, positions, cu = [], [], [], [0]
    for ids, lab in _sequences(features):
        input_ids += ids
        labels += lab
        positions += range(len(ids))
        cu.append(cu[-1] + len(ids))
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
        "cu_seqlens": torch.tensor(cu),
    }
    return _with_ref(batch, features)


def pad_groups(features, pad_token_id: int) -> dict:
    """Groups -> one sequence per row: input_ids, attention_mask, labels [S, T] (right padding)."""
    seqs = list(_sequences(features))
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_token_id)
    labels = torch.full((len(seqs), T), IGNORE_INDEX)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return _with_ref({"input_ids": input_ids, "attention_mask": mask, "labels": labels}, features)


def _with_ref(batch, features):
    """Adds the group shape (K, number of chosen) and, if precomputed, ref_logps [B, K]."""
    batch["responses_per_prompt"] = len(features[0]["responses"])
    batch["num_chosen"] = features[0]["num_chosen"]
    if any(len(f["responses"]) != batch["responses_per_prompt"] for f in features):
        raise ValueError("every group of a batch needs the same number of responses")
    if "ref_logps" in features[0]:
        batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
    return batch


class PreferenceCollator:
    """``data_collator`` for the trainer: packs (default) or pads the groups of a batch."""

    def __init__(self, pad_token_id: int, *, packing: bool = True):
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, features) -> dict:
        return pack_groups(features) if self.packing else pad_groups(features, self.pad_token_id)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, L] position ids restarting per sequence -> additive mask [1, 1, L, L]: 0 where token i may
    attend to j (same sequence, j <= i), the dtype's minimum elsewhere. For sdpa/eager attention,
    which do not separate packed sequences by position ids alone (DESIGN §5)."""
    pos = position_ids[0]
    seq = torch.cumsum((pos == 0).to(torch.int64), 0)
    idx = torch.arange(pos.numel(), device=pos.device)
    allowed = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
