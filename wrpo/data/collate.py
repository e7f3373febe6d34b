"""Batches of preference groups: packed into one padding-free row, or padded (docs/method.md §2).

A sequence is prompt + one response. Labels are shifted for the fused loss: the hidden state at
position t predicts token t+1, so ``labels[t] = ids[t+1]`` where t+1 is a response token, else
-100. Packed: every sequence of every group back to back in one row [1, L] (or one row per group),
position ids restarting at 0 per sequence, ``cu_seqlens`` [S+1] marking the bounds. Padded: one
sequence per row [S, T]. Shared prefix (:func:`pack_shared_prefix`): each prompt once per group,
its responses after it with positions restarting at the prompt's length. Every batch carries its
``"layout"`` (:class:`wrpo.data.batch.SequenceLayout`), read on the host here once, so that the model
entry and the attention never read it back from the device.
"""

from __future__ import annotations

import torch

from wrpo.data.batch import SequenceLayout
from wrpo_kernels.packing import sequence_ids

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


def pack_groups(features, *, row_per_group: bool = False, pad_token_id: int = 0) -> dict:
    """Groups [{prompt_ids, responses[K], num_chosen, ref_logps?}] -> input_ids, position_ids, labels
    [R, L], cu_seqlens [S+1] (int64, over the R*L flattened tokens) and, if present, ref_logps [B, K].

    ``row_per_group=False``: one padding-free row (R = 1), for varlen attention (flash-attention).
    ``row_per_group=True``: one row per group (R = B), right-padded to the longest group; for
    attention through a dense block mask, whose cost grows with the square of the row length, so
    that B groups cost B row-squares and not (B rows)^2. Padding tokens (``pad_token_id``, label
    -100, positions restarting at 0, see :func:`padding_positions`) are counted into the group's last
    sequence in ``cu_seqlens``; they are ignored by the loss and no real token attends to them.
    """
    rows = [features] if not row_per_group else [[f] for f in features]
    packed = []
    for groups in rows:
        ids, labels, positions, lengths = [], [], [], []
        for seq_ids, lab in _sequences(groups):
            ids += seq_ids
            labels += lab
            positions += range(len(seq_ids))
            lengths.append(len(seq_ids))
        packed.append((ids, labels, positions, lengths))
    L = max(len(p[0]) for p in packed)
    longest = max(max(p[3]) for p in packed)
    input_ids, labels, positions, cu = [], [], [], [0]
    for ids, lab, pos, lengths in packed:
        pad = L - len(ids)
        input_ids.append(ids + [pad_token_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        positions.append(pos + padding_positions(pad, longest))
        lengths[-1] += pad
        for n in lengths:
            cu.append(cu[-1] + n)
    return _with_ref(packed_batch("packed", input_ids, positions, labels, cu), features)


def packed_batch(kind: str, input_ids, positions, labels, cu, **head) -> dict:
    """The tensors of packed rows (``head``: more head-side tensors, as ``head_index``) and their
    recorded :class:`~wrpo.data.batch.SequenceLayout`."""
    position_ids = torch.tensor(positions)
    return {
        "input_ids": torch.tensor(input_ids),
        "position_ids": position_ids,
        "labels": torch.tensor(labels),
        "cu_seqlens": torch.tensor(cu),
        **{name: torch.tensor(values) for name, values in head.items()},
        "layout": SequenceLayout.record(kind, position_ids, cu),
    }


def padding_positions(pad: int, longest: int) -> list[int]:
    """Positions of ``pad`` padding tokens at the end of a packed row: 0, 1, ... restarting every
    ``longest`` tokens (the batch's longest sequence), so that no position exceeds a real one. Rope
    scalings that read the largest position (dynamic NTK, longrope) and sliding-window checks then
    see the real sequences' lengths only."""
    return [i % max(longest, 1) for i in range(pad)]


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
    layout = SequenceLayout("padded")
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "layout": layout}
    return _with_ref(batch, features)


def _with_ref(batch, features):
    """Adds the group shape (K, number of chosen) and, if precomputed, ref_logps [B, K]."""
    batch["responses_per_prompt"] = len(features[0]["responses"])
    batch["num_chosen"] = features[0]["num_chosen"]
    for name, of in (("responses", lambda f: len(f["responses"])), ("num_chosen", lambda f: f["num_chosen"])):
        values = [of(f) for f in features]
        if len(set(values)) > 1:
            odd = next(i for i, v in enumerate(values) if v != values[0])
            raise ValueError(
                f"every group of a batch needs the same {name}: group 0 has {values[0]}, group {odd} has "
                f"{values[odd]} (the loss reads one K and one number of chosen responses per batch)"
            )
    if "ref_logps" in features[0]:
        batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
    return batch


class PreferenceCollator:
    """``data_collator`` for the trainer: packs (default) or pads the groups of a batch.

    ``row_per_group``: with packing, one row per group instead of one row for the batch (see
    :func:`pack_groups`); the trainer sets it unless the model attends with flash-attention varlen.
    ``prefix_sharing``: with packing, each prompt once for its responses (:func:`pack_shared_prefix`).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        packing: bool = True,
        row_per_group: bool = False,
        prefix_sharing: bool = False,
    ):
        self.pad_token_id, self.packing, self.row_per_group = pad_token_id, packing, row_per_group
        self.prefix_sharing = prefix_sharing

    def __call__(self, features) -> dict:
        if not self.packing:
            return pad_groups(features, self.pad_token_id)
        pack = pack_shared_prefix if self.prefix_sharing else pack_groups
        return pack(features, row_per_group=self.row_per_group, pad_token_id=self.pad_token_id)


def batch_counts(batch: dict) -> torch.Tensor:
    """[2] int64: the number of groups of a collated batch and the label tokens of their first chosen
    responses (what the group mean and the NLL mean divide by)."""
    K = batch["responses_per_prompt"]
    labels = batch["labels"]
    if "cu_seqlens" in batch:  # packed: the sequence of each token
        S = batch["cu_seqlens"].numel() - 1
        seq = sequence_ids(batch["cu_seqlens"], labels.numel()).view(labels.shape)
    else:  # padded: one sequence per row
        S = labels.shape[0]
        seq = torch.arange(S, device=labels.device)[:, None]
    first = (seq % K == 0) & (labels != IGNORE_INDEX)
    return torch.stack([torch.tensor(S // K, device=labels.device), first.sum()])


def pack_shared_prefix(features, *, row_per_group: bool = False, pad_token_id: int = 0) -> dict:
    """Groups -> packed rows where each prompt is encoded once for its K responses.

    A group lies as prompt + y_1 + ... + y_K in one stretch of a row. The prompt has positions 0..P-1;
    every response's positions restart at P, as if it followed the prompt alone. That restart tells
    the attention (``wrpo/model/attention.py``, or the dense mask of ``wrpo/model/masks.py``) that a
    response sees the first P tokens of its group and itself, causally, never another response.

    Returns ``input_ids`` and ``position_ids`` [R, L] (padding as in :func:`pack_groups`) for the
    model body, and for the head ``head_index`` [N] (rows of the flattened [R*L] hidden states),
    ``labels`` [N] and ``cu_seqlens`` [S+1] over those N gathered rows, one sequence per response.
    Gathered row i predicts ``labels[i]``: the prompt's last row is gathered once per response (it
    predicts each response's first token, and autograd sums its K gradients), then the response's
    rows, the last one ignored (it predicts nothing: every sequence ends on an ignored label, as in
    :func:`pack_groups`). With an empty prompt, as in :func:`pack_groups`, a response's first token is
    not predicted (its rows are gathered with labels shifted by one, the last ignored).
    """
    rows = [features] if not row_per_group else [[f] for f in features]
    packed = []
    for groups in rows:
        ids, positions, gathered = [], [], []  # gathered: per response, [(row index in the row, label)]
        for f in groups:
            prompt = list(f["prompt_ids"])
            P, g = len(prompt), len(ids)
            ids += prompt
            positions += range(P)
            for response in f["responses"]:
                response = list(response)
                start = len(ids)
                ids += response
                positions += range(P, P + len(response))
                if P > 0:
                    rows_k = [g + P - 1] + list(range(start, start + len(response)))
                    labels_k = response + [IGNORE_INDEX]
                else:
                    rows_k = list(range(start, start + len(response)))
                    labels_k = response[1:] + [IGNORE_INDEX]
                if not rows_k:  # an empty response: one ignored row keeps its sequence non-empty
                    rows_k, labels_k = [max(start - 1, 0)], [IGNORE_INDEX]
                gathered.append(list(zip(rows_k, labels_k, strict=True)))
        packed.append((ids, positions, gathered))
    L = max(len(p[0]) for p in packed)
    longest = max(max(p[1], default=0) for p in packed) + 1  # prompt + response, the longest
    input_ids, positions, head_index, labels, cu = [], [], [], [], [0]
    for r, (ids, pos, gathered) in enumerate(packed):
        pad = L - len(ids)
        input_ids.append(ids + [pad_token_id] * pad)
        positions.append(pos + padding_positions(pad, longest))
        for seq in gathered:
            head_index += [r * L + t for t, _ in seq]
            labels += [lab for _, lab in seq]
            cu.append(cu[-1] + len(seq))
    batch = packed_batch("shared_prefix", input_ids, positions, labels, cu, head_index=head_index)
    return _with_ref(batch, features)
