"""The model body (its LM head skipped) over a collated batch, its packed sequences kept apart.

Packed rows are separated by ``position_ids``: flash-attention varlen and ``wrpo_segments``
(:mod:`wrpo.model.attention`) do it alone; other attention implementations get a dense mask
(:mod:`wrpo.model.masks`). The batch's :class:`~wrpo.data.batch.SequenceLayout` tells which layout it
is and, when the collator recorded it, where its sequences lie: the attention and the per-sequence
mixers are handed those host values instead of reading ``position_ids`` back from the device.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from wrpo.data.batch import SequenceLayout, layout_of
from wrpo.model.attention import FLASH_ATTENTION, stretches_of
from wrpo.model.attention import NAME as SEGMENT_ATTENTION
from wrpo.model.capabilities import body_of, read_capabilities, sliding_window
from wrpo.model.masks import block_causal_mask, shared_prefix_mask
from wrpo.model.mixers import separate_sequences


def body_hidden_states(lm: PreTrainedModel, batch) -> torch.Tensor:
    """Final hidden states of the model body: packed [R, L, H] or padded [S, T, H].

    Shared-prefix rows need ``wrpo_segments`` or a dense mask: flash-attention varlen would run each
    response on from the one before it. A packed batch whose sequences would attend to each other is
    refused first (:func:`check_sequences_separated`)."""
    layout = layout_of(batch)
    check_sequences_separated(lm, batch, layout)
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if not layout.packed:
        kwargs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
    else:
        positions = kwargs["position_ids"] = batch["position_ids"]
        if layout.stretches is not None:
            stretches_of.seed(positions, layout.stretches)
        impl = lm.config._attn_implementation
        if layout.kind == "shared_prefix" and impl != SEGMENT_ATTENTION:
            if varlen_attention(lm):
                raise ValueError(
                    f"shared-prefix batches need attn_implementation={SEGMENT_ATTENTION!r} (or sdpa/eager "
                    f"with a dense mask); {impl} separates packed sequences at position 0 only"
                )
            refuse_windows_in_dense_masks(lm, positions, layout)
            kwargs["attention_mask"] = shared_prefix_mask(positions, lm.dtype)
        elif not varlen_attention(lm):
            refuse_windows_in_dense_masks(lm, positions, layout)
            kwargs["attention_mask"] = block_causal_mask(positions, lm.dtype)
        separate_sequences(lm)  # hybrid models: conv / recurrent layers one sequence at a time
    out = body_of(lm)(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def varlen_attention(lm) -> bool:
    """Whether ``lm`` separates packed sequences by position ids alone (flash-attention varlen, or
    :mod:`wrpo.model.attention`'s per-sequence sdpa); else a dense block mask is passed."""
    return lm.config._attn_implementation in (*FLASH_ATTENTION, SEGMENT_ATTENTION)


def refuse_windows_in_dense_masks(lm, position_ids: torch.Tensor, layout: SequenceLayout) -> None:
    """A dense packed mask replaces the model's own masks, sliding windows included: refuse a batch with
    a sequence longer than the window rather than attend past it (the longest sequence from the
    recorded layout, else one host read of the positions)."""
    window = sliding_window(lm.config)
    if window is None:
        return
    longest = layout.longest if layout.longest is not None else int(position_ids.max()) + 1
    if longest > window:
        raise ValueError(
            f"{type(lm).__name__} attends within {window}-token sliding windows, which the dense packed "
            f"mask for {lm.config._attn_implementation} does not apply, and this batch has sequences of "
            f"{longest} tokens: use attn_implementation={SEGMENT_ATTENTION!r}, which applies the windows "
            "(or packing=False)"
        )


def check_sequences_separated(lm: PreTrainedModel, batch, layout: SequenceLayout) -> None:
    """Refuse a packed batch whose sequences the body would let attend to each other (docs/method.md §5).

    A packed row holds several sequences; the attention finds where each starts only from
    ``position_ids`` restarting at 0. Without them, with positions that do not restart at every start
    in ``cu_seqlens``, or under flash-attention with more than one row (its varlen path reads position
    ids of a single row only), every sequence would attend to the ones before it in its row and train
    on leaked context. A batch with the collator's recorded layout has its positions made to match;
    a hand-built one costs one host read (the position at each sequence start). Padded batches (one
    sequence per row) are not checked."""
    if not layout.packed:
        return
    why = read_capabilities(lm).packing_blocker
    if why is not None:
        raise ValueError(f"packed batch refused: {why}; collate with packing=False (one sequence per row)")
    fix = (
        "build the batch with wrpo.PreferenceCollator(pad_token_id, packing=True), whose position_ids "
        "restart at 0 for every sequence, or use packing=False (one sequence per row, attention_mask)"
    )
    if "position_ids" not in batch:
        raise ValueError(
            f"packed batch (cu_seqlens: {batch['cu_seqlens'].numel() - 1} sequences in "
            f"{batch['input_ids'].shape[0]} row(s)) without position_ids: its sequences would attend to "
            f"each other; {fix}"
        )
    impl = lm.config._attn_implementation
    rows = batch["input_ids"].shape[0]
    if impl in FLASH_ATTENTION and rows > 1:
        raise ValueError(
            f"{impl} separates packed sequences only in a batch of one row (transformers reads "
            f"position_ids as varlen bounds only then), this one has {rows}: its sequences would attend "
            f"to each other; collate with row_per_group=False (one row), or use "
            f"attn_implementation={SEGMENT_ATTENTION!r} or 'sdpa' (a block mask is built)"
        )
    if layout.stretches is not None or layout.kind == "shared_prefix":
        return  # recorded by the collator; shared prefix: cu_seqlens counts head rows, not body tokens
    positions = batch["position_ids"].expand_as(batch["input_ids"]).reshape(-1)
    starts = batch["cu_seqlens"][:-1].to(device=positions.device, dtype=torch.int64)
    wrong = positions.index_select(0, starts) != 0
    if bool(wrong.any()):
        first = int(wrong.nonzero()[0])
        raise ValueError(
            f"position_ids do not restart at 0 where sequence {first} starts (token "
            f"{int(starts[first])} of the flattened rows, per cu_seqlens): the attention would let it "
            f"attend to the sequences before it; {fix}"
        )
