"""The sequence layout of a collated batch, recorded by the collator so that nothing decodes it again.

A batch is a dict of tensors (what transformers' Trainer moves to the device) plus ``batch["layout"]``,
a :class:`SequenceLayout` of host values: the layout kind, each packed row's stretches, the head rows'
sequence bounds and the longest sequence. The model entry, the packed attention and the per-sequence
mixers read it instead of reading ``position_ids`` and ``cu_seqlens`` back from the device; a batch
built by hand (no ``"layout"``) is decoded from its ``position_ids`` as before (:func:`segment_layout`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

KINDS = ("padded", "packed", "shared_prefix")
Stretch = tuple[int, int, int, int]  # (start, end, prefix_start, prefix_len) within a row


@dataclass(frozen=True)
class SequenceLayout:
    """How a batch lays out its sequences (host values, no tensor).

    ``kind``: "padded" (one sequence per row, ``attention_mask``), "packed" (sequences back to back,
    ``position_ids`` restarting at 0) or "shared_prefix" (each prompt once per group, see
    ``wrpo/data/collate.py``). ``stretches``: per packed row, :func:`segment_layout` of its positions.
    ``head_cu_seqlens``: [S+1] bounds of the sequences over the head's rows (``batch["cu_seqlens"]``).
    ``longest``: tokens of the longest sequence (prompt + response). None where unknown or unused
    (padded; a hand-built batch: read from the tensors when needed)."""

    kind: str
    stretches: tuple[tuple[Stretch, ...], ...] | None = None
    head_cu_seqlens: tuple[int, ...] | None = None
    longest: int | None = None

    @property
    def packed(self) -> bool:
        """Several sequences per row (packed or shared prefix)."""
        return self.kind != "padded"

    @classmethod
    def record(cls, kind: str, position_ids: torch.Tensor, cu_seqlens: list[int]) -> SequenceLayout:
        """The layout of packed rows the collator just built: ``position_ids`` [R, L] on the host."""
        stretches = tuple(tuple(row) for row in segment_layout(position_ids))
        longest = max(b - a + p for row in stretches for a, b, _, p in row)
        return cls(kind, stretches, tuple(cu_seqlens), longest)


def layout_of(batch) -> SequenceLayout:
    """``batch["layout"]`` as the collator recorded it, else the kind its keys show (values unknown)."""
    layout = batch.get("layout")
    if layout is not None:
        check_recorded_shape(layout, batch)
        return layout
    if "head_index" in batch:
        return SequenceLayout("shared_prefix")
    return SequenceLayout("packed" if "cu_seqlens" in batch else "padded")


def check_recorded_shape(layout: SequenceLayout, batch) -> None:
    """The recorded stretches must cover the batch's rows: a batch edited after collation (rows added or
    cut) is refused, naming the fix. (Edits that keep the shape cannot be seen without reading the
    positions back: whoever edits ``position_ids`` must drop ``batch["layout"]``.)"""
    if layout.stretches is None or "position_ids" not in batch:
        return
    R, L = batch["position_ids"].shape[-2:]
    recorded = (len(layout.stretches), max(row[-1][1] for row in layout.stretches))
    if recorded != (R, L):
        raise ValueError(
            f'batch["layout"] was recorded for position_ids of shape {list(recorded)}, the batch has '
            f"{[R, L]}: a batch changed after collation must drop its 'layout' (it is then read from "
            "position_ids)"
        )


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[R, L] position ids -> per row, the [start, end) of each sequence (a new one wherever position 0)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [rows, L], got shape {tuple(position_ids.shape)}")
    L = position_ids.shape[1]
    starts = (position_ids == 0).clone()
    starts[:, 0] = True
    bounds = []
    for row in starts.cpu():
        s = row.nonzero().flatten().tolist()
        bounds.append(list(zip(s, s[1:] + [L], strict=True)))
    return bounds


def segment_layout(position_ids: torch.Tensor) -> list[list[Stretch]]:
    """[R, L] position ids -> per row, ``(start, end, prefix_start, prefix_len)`` of each stretch.

    A stretch runs while positions go on by one. Within a sequence (from a position 0), a stretch
    whose positions restart at p > 0 is a response sharing the sequence's first p tokens (its prompt,
    :func:`wrpo.data.collate.pack_shared_prefix`): it attends to them and causally to itself. Those p
    tokens must lie in the sequence's first stretch; anything else is refused. Other stretches have
    ``prefix_len`` 0.
    """
    out = []
    pos_rows = position_ids.cpu()
    for row, segments in zip(pos_rows, segment_bounds(pos_rows), strict=True):
        breaks = (row[1:] != row[:-1] + 1).nonzero().flatten().add(1).tolist()
        values = row.tolist()
        pieces = []
        for a, b in segments:
            cuts = breaks[bisect.bisect_right(breaks, a) : bisect.bisect_left(breaks, b)]
            starts = [a, *cuts]
            first_end = starts[1] if len(starts) > 1 else b
            for s, e in zip(starts, [*cuts, b], strict=True):
                if s == a:
                    pieces.append((s, e, a, 0))
                    continue
                p = values[s]
                if p > first_end - a or values[a] != 0:
                    raise ValueError(
                        f"position_ids restart at {p} at index {s}: a shared-prefix response needs its "
                        f"group's first {p} tokens before it (positions 0..{p - 1} in one stretch, found "
                        f"{first_end - a} from index {a})"
                    )
                pieces.append((s, e, a, p))
        out.append(pieces)
    return out
