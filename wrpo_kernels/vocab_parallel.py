"""A vocabulary-parallel head: the weight [V, H] (and bias [V]) sharded over the vocabulary across ranks.

Tensor parallelism shards the LM head by rows (``parallelize_module(model, mesh, {"lm_head":
ColwiseParallel()})``: a DTensor placed ``Shard(0)`` on the tensor-parallel mesh dimension). Each rank
keeps its rows ``[start, start + size)`` of the vocabulary and the same hidden states (replicated over
that dimension). Per chunk of n rows, the ranks' partial results combine with two all-reduces of
[n]-vectors, whatever V is:

    lse = m + log sum_r exp(lse_r - m),  m = max_r lse_r     (all-reduce MAX, then SUM)
    z[label] = sum_r z_r[label] * [label in shard r]         (in the same SUM)

and the gradient dL/dz stays on its rank: its softmax part uses the global lse, its one-hot part only
on the rank owning the label. dW and db are each rank's own shard; dX is a partial sum per rank,
summed over the ranks in the backward (:func:`replicated_input`: one [N, H] all-reduce per call).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .objective import math_dtype


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + size)`` of a vocabulary of ``vocab`` entries over ``group``."""

    group: object  # torch.distributed.ProcessGroup
    start: int
    size: int
    vocab: int


def _dtensor_module():
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(x) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(x, module.DTensor)


def vocab_shard(weight, bias):
    """-> (weight, bias, shard): plain tensors come back as they are with shard None. A DTensor weight
    placed ``Shard(0)`` on one mesh dimension and ``Replicate()`` on the others (a bias alike) comes back
    as its local rows (differentiable: gradients flow back into the DTensor with its placements) and
    the :class:`VocabShard` of this rank. Any other DTensor raises ValueError naming its placements."""
    if not is_dtensor(weight):
        if is_dtensor(bias):
            raise ValueError(
                "bias is a DTensor but weight is not: shard both over the vocabulary, or neither"
            )
        return weight, bias, None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(weight.placements)
    sharded = [d for d, p in enumerate(placements) if p != Replicate()]
    if len(sharded) != 1 or placements[sharded[0]] != Shard(0):
        raise ValueError(_refusal(placements))
    dim = sharded[0]
    if bias is not None and (not is_dtensor(bias) or tuple(bias.placements) != placements):
        got = tuple(bias.placements) if is_dtensor(bias) else type(bias).__name__
        raise ValueError(f"bias must be sharded like weight over the vocabulary ({placements}), got {got}")
    mesh = weight.device_mesh
    group = mesh.get_group(dim)
    local = weight.to_local()
    sizes = _all_gather_sizes(local.shape[0], group, local.device)
    rank = torch.distributed.get_rank(group)
    shard = VocabShard(group, sum(sizes[:rank]), sizes[rank], sum(sizes))
    if shard.vocab != weight.shape[0]:
        raise ValueError(f"the ranks' vocabulary rows sum to {shard.vocab}, not V = {weight.shape[0]}")
    return local, None if bias is None else bias.to_local(), shard


def _refusal(placements) -> str:
    return (
        f"weight is a DTensor placed {placements}: the fused head takes a whole [V, H] weight or one "
        "sharded over the vocabulary only (Shard(0) on one mesh dimension, Replicate() on the others: "
        "tensor parallel, e.g. ColwiseParallel on lm_head). A weight sharded otherwise -- FSDP2 keeps its "
        "parameters sharded outside the forward -- must be gathered first: call the loss inside the "
        "model's forward, e.g. through wrpo.preference_loss(model, batch)"
    )


def _all_gather_sizes(size: int, group, device) -> list[int]:
    world = torch.distributed.get_world_size(group)
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(out, mine, group=group)
    return [int(t) for t in out]


def check_replicated(shard: VocabShard, labels: torch.Tensor, cu: torch.Tensor) -> None:
    """Every rank of the shard's group must hold the same labels and bounds (the hidden states come
    from the same tokens): a fingerprint of each is compared across the group (one small all-reduce)."""

    def fingerprint(t: torch.Tensor) -> torch.Tensor:  # int64: exact in any summation order
        t = t.reshape(-1).to(torch.int64)
        return (t * torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.int64)).sum()

    count = torch.tensor(labels.numel(), dtype=torch.int64, device=labels.device)
    prints = torch.stack([count, fingerprint(labels), fingerprint(cu.to(labels.device))])
    both = all_reduce(torch.cat([prints, -prints]), torch.distributed.ReduceOp.MAX, shard.group)
    if not torch.equal(both[:3], -both[3:]):
        raise ValueError(
            "the head's weight is a DTensor sharded over the vocabulary (Shard(0)), but the ranks of its "
            "group hold different labels or sequence bounds: a vocabulary-parallel head needs the same "
            "batch on every rank of its tensor-parallel group. If this is FSDP2's shard of the weight (a "
            "data-parallel split), call the loss inside the model's forward, e.g. through "
            "wrpo.preference_loss(model, batch), so that FSDP gathers the weight"
        )


def all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """In place; every all-reduce of the sharded head goes through here (tests count the bytes)."""
    torch.distributed.all_reduce(t, op=op, group=group)
    return t


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), torch.distributed.ReduceOp.SUM, ctx.group), None


def replicated_input(hidden: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """``hidden`` as it is; in the backward, its gradient summed over the shard's group (each rank's
    dX comes from its own vocabulary rows only)."""
    if shard is None or not torch.is_grad_enabled() or not hidden.requires_grad:
        return hidden
    return _ReplicatedInput.apply(hidden, shard.group)


class _ShardState:
    """The inner row ops' state, plus what the gradient's fix-up needs: which rows have their label in
    this shard, and (with a soft cap) the raw logit of local column 0."""

    def __init__(self, inner, raw0):
        self.inner, self.raw0, self.local, self.safe_local = inner, raw0, None, None


class VocabParallelRowOps:
    """Row ops (``chunked.RowOps``) over this rank's vocabulary rows, combined across the group."""

    def __init__(self, inner, shard: VocabShard):
        self.inner, self.shard = inner, shard
        self.name = f"{inner.name}+vocab-parallel"

    def workspace(self, rows, vocab, dtype, device, *, softcap_grad: bool):
        return self.inner.workspace(rows, vocab, dtype, device, softcap_grad=softcap_grad)

    def logits(self, ws, hidden, weight, bias, opts, *, for_grad: bool):
        raw0 = None
        if for_grad and opts.softcap is not None:  # the soft cap's slope at column 0 (see grad)
            raw0 = hidden @ weight[0] if bias is None else hidden @ weight[0] + bias[0]
            raw0 = raw0.to(math_dtype(raw0.dtype))
        return _ShardState(self.inner.logits(ws, hidden, weight, bias, opts, for_grad=for_grad), raw0)

    def _local_labels(self, st: _ShardState, safe):
        """The chunk's labels as rows of this shard (0 where another rank owns them), once per chunk."""
        if st.local is None:
            local = safe - self.shard.start
            st.local = (local >= 0) & (local < self.shard.size)
            st.safe_local = torch.where(st.local, local, 0)
        return st.safe_local

    def stats(self, st: _ShardState, safe, opts):
        lse_r, target_r = self.inner.stats(st.inner, self._local_labels(st, safe), opts)
        dist, group = torch.distributed, self.shard.group
        m = all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        parts = torch.stack([(lse_r - m).exp(), torch.where(st.local, target_r, 0.0)])
        all_reduce(parts, dist.ReduceOp.SUM, group)
        return m + parts[0].log(), parts[1]

    def grad(self, st: _ShardState, safe, scale, lse, opts):
        """The inner gradient with the global ``lse``; rows whose label lives on another rank got a
        one-hot at local column 0 (their stand-in label): it is taken back out."""
        g = self.inner.grad(st.inner, self._local_labels(st, safe), scale, lse, opts)
        wrong = (~st.local).to(scale.dtype) * scale / opts.temperature
        if st.raw0 is not None:
            wrong = wrong * (1 - torch.tanh(st.raw0 / opts.softcap) ** 2).to(scale.dtype)
        g[:, 0] -= wrong.to(g.dtype)
        return g

    def lowp(self, ws, n: int):
        return self.inner.lowp(ws, n)

    def group_loss(self, spec, tok, targets, chunk, ref, lengths):
        return self.inner.group_loss(spec, tok, targets, chunk, ref, lengths)


def vocab_parallel(ops, shard: VocabShard | None):
    """``ops`` itself for a whole head, else its vocabulary-parallel wrapper."""
    return ops if shard is None else VocabParallelRowOps(ops, shard)
