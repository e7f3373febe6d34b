"""Input checks shared by every backend. Each error names the argument, its shape and the offending index.

Checks that read tensor values (labels, token counts) are batched into one host synchronisation.
"""

from __future__ import annotations

import torch

from .packing import padded_to_packed, segment_sum

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_packed_rows(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens):
    """Bring the inputs to packed form: hidden [N, H], labels [N], cu_seqlens [S+1] (int64, device).

    Accepts packed rows ([N, H] with ``cu_seqlens``, a tensor or a host sequence of ints (then nothing
    is read back from the device); without it, one sequence) or padded sequences ([S, T, H] with
    ``cu_seqlens=None``, one sequence per row).
    Returns the three tensors and ``cu_seqlens`` as a host list (the chunk schedule needs it).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be [N, H] packed rows or [S, T, H] padded sequences, got {shape}")
    if hidden.dim() == 3 and cu_seqlens is not None:
        raise ValueError(_layout_mismatch(tuple(hidden.shape)))
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without H), got {shape}")
    if hidden.dim() == 3:
        S, T = labels.shape
        hidden, labels, cu = padded_to_packed(hidden, labels)
        return hidden, labels, cu, list(range(0, (S + 1) * T, T))
    N = hidden.shape[0]
    if cu_seqlens is None:
        cu_seqlens = [0, N]
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor [S+1], got shape {tuple(cu_seqlens.shape)} "
                f"dtype {cu_seqlens.dtype}"
            )
        cu_host = cu_seqlens.tolist()
    else:  # host bounds: nothing read back from the device
        cu_host = list(cu_seqlens)
        if len(cu_host) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in cu_host):
            raise ValueError(
                f"cu_seqlens must be [S+1] integers (a tensor or a sequence), got {cu_seqlens!r}"
            )
        cu_seqlens = torch.tensor(cu_host, dtype=torch.int64)
    if cu_host[0] != 0 or cu_host[-1] != N:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at N={N} (hidden rows), got {cu_host[0]}..{cu_host[-1]}"
        )
    for i in range(1, len(cu_host)):
        if cu_host[i] < cu_host[i - 1]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing: "
                f"cu_seqlens[{i}]={cu_host[i]} < cu_seqlens[{i - 1}]={cu_host[i - 1]}"
            )
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int64)
    return hidden, labels, cu, cu_host


def _layout_mismatch(shape: tuple) -> str:
    """The error for a 3-D hidden passed with ``cu_seqlens``: the two layouts, and how to get either."""
    H = shape[-1]
    return (
        f"hidden is 3-D {shape} but cu_seqlens was given: cu_seqlens [S+1] goes with packed rows, hidden "
        f"[N, H] and labels [N] (the S sequences back to back). For a packed batch, flatten it: "
        f"hidden.reshape(-1, {H}) and labels.reshape(-1) (a [1, N, H] model output is one such batch). "
        f"For padded sequences, pass cu_seqlens=None: hidden [S, T, H] with labels [S, T], one sequence "
        f"per row, padding labelled ignore_index"
    )


def check_not_module(name: str, x) -> None:
    """TypeError if ``x`` is an ``nn.Module`` (``lm_head``) where its parameter (``lm_head.weight``) goes."""
    if isinstance(x, torch.nn.Module):
        also = " (and bias=lm_head.bias if the head has one)" if name == "weight" else ""
        raise TypeError(
            f"{name} is a module ({type(x).__name__}), not a tensor: "
            f"pass `lm_head.{name}`{also}, not `lm_head`"
        )


def check_materialised(name: str, x) -> None:
    """``x`` (the head's weight or bias, DTensors already resolved by ``vocab_parallel.vocab_shard``)
    must not be a parameter DeepSpeed ZeRO-3 released (0 elements) outside the forward."""
    if isinstance(x, torch.Tensor) and x.numel() == 0:
        raise ValueError(
            f"{name} has 0 elements (a parameter released by DeepSpeed ZeRO-3?), shape {tuple(x.shape)}: "
            f"call the loss inside the model's forward, e.g. through wrpo.preference_loss(model, batch), "
            f"so that the parameter is gathered (or gather it with deepspeed.zero.GatheredParameters)"
        )


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor) -> None:
    """hidden [N, H] and weight [V, H] of one float dtype on one device; bias [V]; integer labels [N].

    weight and bias must be whole tensors (:func:`check_materialised`), not modules (TypeError).
    """
    check_not_module("weight", weight)
    check_not_module("bias", bias)
    if hidden.dtype not in _FLOAT:
        raise ValueError(f"hidden must be a floating tensor, got {hidden.dtype}")
    check_materialised("weight", weight)
    if bias is not None:
        check_materialised("bias", bias)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[1]} (hidden's last dim), got {shape}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(
                f"bias is {bias.dtype} on {bias.device}; "
                f"it must match hidden ({hidden.dtype} on {hidden.device})"
            )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {hidden.device}")


def check_labels(labels, cu, seq, vocab: int, ignore_index: int, *, require_tokens, describe):
    """Labels in [0, V) or ``ignore_index``, shifted; with ``require_tokens`` every sequence needs one
    valid label. ``cu`` [S+1]: the sequences' bounds in the packed rows, ``seq`` [N] each row's sequence.

    Shifted labels (``labels[t] = ids[t+1]`` within a sequence) leave the last position of every
    sequence without a target, so it must be ``ignore_index``; a labelled last position means the
    labels were not shifted (``labels = input_ids``, as transformers models take them) and every
    log-prob would score each token as its own prediction.

    Returns the valid-token count per sequence, n [S] (int64), on the device and as a host list.
    ``describe(s)`` names sequence s in error messages. One host synchronisation.
    """
    num_seqs = cu.numel() - 1
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    counts = segment_sum(valid.to(torch.int64), seq, num_seqs)
    ends = (cu[1:] - 1).clamp_min(0)
    nonempty = cu[1:] > cu[:-1]
    unshifted = (nonempty & valid.index_select(0, ends)) if labels.numel() else nonempty
    any_bad, any_unshifted, any_empty, *counts_host = torch.cat(
        [torch.stack([bad.any(), unshifted.any(), (counts == 0).any()]), counts]
    ).tolist()
    if any_bad:
        t = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{t}] = {int(labels[t])} is outside [0, {vocab}) and is not ignore_index={ignore_index} "
            f"(in {describe(int(seq[t]))})"
        )
    if any_unshifted:
        s = int(unshifted.nonzero()[0, 0])
        t = int(ends[s])
        raise ValueError(
            f"labels[{t}] = {int(labels[t])} is the last position of {describe(s)} and is labelled: the "
            f"labels look unshifted (labels = input_ids). Shift them within each sequence, "
            f"labels[t] = input_ids[t+1], and set the last position to ignore_index={ignore_index} "
            f"(e.g. labels = torch.cat([ids[1:], ids.new_full((1,), {ignore_index})]) per sequence; "
            f"wrpo.pad_groups and wrpo.PreferenceCollator build them so)"
        )
    if require_tokens and any_empty:
        s = int((counts == 0).nonzero()[0, 0])
        raise ValueError(
            f"{describe(s)} has no label != ignore_index={ignore_index}; its log-prob is undefined"
        )
    return counts, counts_host


def check_preference_tensor(name: str, x, B: int, K: int, device) -> torch.Tensor | None:
    """A per-response tensor given as [B, K] or [S] (S = B*K) -> [B, K] on ``device``."""
    if x is None:
        return None
    x = torch.as_tensor(x)
    if tuple(x.shape) == (B * K,):
        x = x.view(B, K)
    if tuple(x.shape) != (B, K):
        raise ValueError(f"{name} must be [B, K] = [{B}, {K}] or [S] = [{B * K}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {device}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    return x
