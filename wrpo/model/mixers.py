"""Convolution, state-space and linear-attention layers over packed rows, one sequence at a time.

A hybrid model's short convolutions (LFM2), gated delta nets (Qwen3.5, Qwen3-Next) and Mamba scans
(Jamba, Bamba, ...) run over a whole row: in a packed row their state would flow from one sequence
into the next, since they ignore where ``position_ids`` restart. These mixers are causal in time, so
a sequence's outputs equal those of the sequence run alone when it starts a row of its own and later
rows hold only padding. :func:`separate_sequences` hooks each such mixer: before it runs, the
packed rows ``x`` [R, L, H] are regathered into one right-padded row per sequence [S, T, H]; after it,
its output is gathered back to [R, L, H]. A shared-prefix response (``wrpo/data/collate.py``) gets its
group's prompt in front, recomputed (the mixer's state after the prompt carried into the response),
and keeps its own outputs. Rows that hold one sequence from position 0 (padded batches, generation)
and calls with a cache pass through untouched.

The layout comes from the ``position_ids`` given to the mixer's decoder layer (hooks on that layer
run again under gradient checkpointing), else from the body's call: :func:`current_position_ids`.
Attention layers that are not handed ``position_ids`` (Llama-4) read them there too.
"""

from __future__ import annotations

import contextvars

import torch

from wrpo.model.attention import PerForward, stretches_of
from wrpo.model.capabilities import CACHE_ARGUMENTS, body_of, causal_lm, read_capabilities

_positions: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "wrpo_positions", default=None
)
_HOOKED = "_wrpo_per_sequence"


def sequence_index(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """[R, L] position ids -> (gather [S, T], scatter [R*L], T), or None when each row is one sequence.

    ``gather[s, j]`` is the flattened row token at place j of sequence s (R*L: a zero padding row);
    ``scatter[i]`` is the place (s*T + j) of row token i's own output. A shared-prefix stretch
    ``(a, b, g, p)`` reads its group's first p tokens, then its own."""
    R, L = position_ids.shape
    layout = stretches_of(position_ids)
    if all(len(row) == 1 and row[0][3] == 0 for row in layout):
        return None
    sequences, own = [], []  # per sequence: the row tokens it reads, and (first own place, own tokens)
    for r, stretches in enumerate(layout):
        for a, b, g, p in stretches:
            sequences.append(list(range(r * L + g, r * L + g + p)) + list(range(r * L + a, r * L + b)))
            own.append((p, range(r * L + a, r * L + b)))
    T = max(map(len, sequences))
    gather = torch.full((len(sequences), T), R * L, dtype=torch.int64)
    scatter = torch.empty(R * L, dtype=torch.int64)
    for s, (tokens, (p, mine)) in enumerate(zip(sequences, own, strict=True)):
        gather[s, : len(tokens)] = torch.tensor(tokens)
        scatter[torch.tensor(list(mine))] = s * T + p + torch.arange(len(mine))
    device = position_ids.device
    return gather.to(device), scatter.to(device), T


_index_for = PerForward(sequence_index)


def current_position_ids() -> torch.Tensor | None:
    """The ``position_ids`` [R, L] of the decoder layer (or body) running now, once
    :func:`separate_sequences` hooked the model; None outside."""
    return _positions.get()


def _set_positions(module, args, kwargs):
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 3:
        positions = positions[0]  # multimodal rope: [sections, R, L], the text positions first
    token = _positions.set(positions if isinstance(positions, torch.Tensor) else _positions.get())
    module._wrpo_tokens = [*getattr(module, "_wrpo_tokens", []), token]


def _reset_positions(module, args, kwargs, output):
    tokens = getattr(module, "_wrpo_tokens", [])
    if tokens:
        _positions.reset(tokens.pop())


def _regather(module, args, kwargs):
    """Forward pre-hook of a mixer: packed rows [R, L, H] -> one row per sequence [S, T, H]."""
    if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
        return None
    positions = _positions.get()
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if positions is None:
        raise RuntimeError(
            f"{type(module).__name__} ran without the packed rows' position_ids in reach (recomputed "
            "by gradient checkpointing outside its decoder layer?): cannot separate its sequences"
        )
    R, L = hidden.shape[:2]
    if positions.shape[-1] != L:
        raise ValueError(f"position_ids of length {positions.shape[-1]} for rows of {L} tokens")
    # the same tensor in every layer of a forward, so the index is built once (a new view would miss)
    index = _index_for(positions if positions.shape[0] == R else positions.expand(R, L))
    module._wrpo_pending = [*getattr(module, "_wrpo_pending", []), (index, R, L)]
    if index is None:
        return None
    gather, _, T = index
    flat = torch.cat([hidden.reshape(R * L, -1), hidden.new_zeros(1, hidden.shape[-1])])
    rows = flat.index_select(0, gather.reshape(-1)).view(gather.shape[0], T, -1)
    if "hidden_states" in kwargs:
        kwargs = {**kwargs, "hidden_states": rows}
    else:
        args = (rows, *args[1:])
    if "attention_mask" in kwargs:  # the packed mask means nothing per sequence; padding is causal-safe
        kwargs["attention_mask"] = None
    return args, kwargs


def _scatter_back(module, args, kwargs, output):
    """Forward hook of a mixer: its [S, T, H] output back to the packed rows [R, L, H]."""
    index, R, L = module._wrpo_pending.pop()
    if index is None:
        return None
    _, scatter, _ = index
    out = output[0] if isinstance(output, tuple) else output
    back = out.reshape(-1, out.shape[-1]).index_select(0, scatter).view(R, L, -1)
    return (back, *output[1:]) if isinstance(output, tuple) else back


def separate_sequences(model) -> None:
    """Hook ``model`` so that packed rows' sequences stay apart in every layer: the position ids in
    reach of each token mixer (:func:`current_position_ids`), and every convolution / state-space /
    linear-attention mixer run one sequence at a time (see the module docstring). Idempotent."""
    lm = causal_lm(model)
    if vars(lm).get(_HOOKED):
        return
    caps = read_capabilities(lm)
    body = body_of(lm)
    modules = dict(body.named_modules())
    holders = {""} | {
        path.rsplit(".", 1)[0] for path in caps.attention_mixers + caps.sequence_mixers if "." in path
    }
    for path in sorted(holders):  # the body, then each mixer's decoder layer
        modules[path].register_forward_pre_hook(_set_positions, with_kwargs=True)
        modules[path].register_forward_hook(_reset_positions, with_kwargs=True, always_call=True)
    for path in caps.sequence_mixers:
        modules[path].register_forward_pre_hook(_regather, with_kwargs=True)
        modules[path].register_forward_hook(_scatter_back, with_kwargs=True)
    vars(lm)[_HOOKED] = True
