"""Attention over packed rows without a mask: one causal sdpa call per sequence (docs/method.md §5).

Flash-attention's varlen kernel separates packed sequences by their position ids; without it (a CPU,
or a GPU without the ``flash-attn`` extra) sdpa needs a dense block mask [R, 1, L, L], whose memory
and work grow with the square of the row length L although only the blocks on the diagonal count.
``segment_attention`` is a transformers attention function that runs
``F.scaled_dot_product_attention(is_causal=True)`` on each sequence of each row instead: work
sum_i l_i^2 instead of L^2 per row, no mask. Sequences start where ``position_ids`` restarts at 0.

Registered with transformers as ``attn_implementation="wrpo_segments"`` (no mask function: the model
builds none). Unpacked inputs (one sequence per row, no padding) work too: each row is one segment.

Shared prefixes (:func:`wrpo.data.collate.pack_shared_prefix`): where positions restart at P > 0 instead
of 0, a response follows its group's prompt (the group's first P tokens) without repeating it; its
queries attend to ``cat(prompt keys, own keys)`` under a [R, P + R] causal mask aligned to the bottom
right. The prompt and the first response, contiguous, take one causal call.

Sliding windows count logical positions (key position > query position - window, as transformers'
masks): a sequence longer than its layer's window gets the window as a mask. Attention logit soft
capping (Gemma 2: ``tanh(s / c) * c`` before the mask) and attention sinks (gpt-oss's ``s_aux``: one
learned logit per head in every softmax's denominator, its value dropped) run the scores explicitly,
as eager attention.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from wrpo.data.batch import segment_layout

NAME = "wrpo_segments"
# flash-attention implementations: their varlen kernels separate one row's sequences by position ids
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
# keyword arguments of transformers' attention interface that this attention applies or that do not
# change its result; any other one (attention sinks, ALiBi slopes, ...) is refused when set
HANDLED = {
    "sliding_window",
    "softcap",
    "s_aux",
    "use_cache",
    "output_attentions",
    "cache_position",
    "is_causal",
    "layer_idx",
    "position_embeddings",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "head_mask",
}


class PerForward:
    """``fn(position_ids)``, computed once per tensor (and version): every layer of a forward gets the
    same ``position_ids`` tensor, so the later layers reuse the first one's result. :meth:`seed` stores
    a result known beforehand (the collator's :class:`~wrpo.data.batch.SequenceLayout`), so that not even
    the first layer reads the positions back from the device."""

    def __init__(self, fn):
        self.fn = fn
        self.last = None  # (weak reference to position_ids, its version, result)

    def __call__(self, position_ids: torch.Tensor):
        last = self.last
        if last is not None and last[0]() is position_ids and last[1] == position_ids._version:
            return last[2]
        return self.seed(position_ids, self.fn(position_ids))

    def seed(self, position_ids: torch.Tensor, result):
        """Remember ``result`` as ``fn(position_ids)``; returns it."""
        self.last = (weakref.ref(position_ids), position_ids._version, result)
        return result


# the stretches of the running forward's rows, shared by this attention and wrpo.model.mixers
stretches_of = PerForward(segment_layout)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[n_q, n_k] boolean from logical positions: key visible if k <= q and, with a window, k > q - window."""
    q, k = q_pos[:, None], k_pos[None, :]
    seen = k <= q
    return seen & (k > q - window) if window is not None else seen


def _explicit_attention(q, k, v, visible, scale, softcap, sinks, dropout_p, gqa):
    """Attention with logit soft capping (``tanh(s / c) * c``) and/or sinks (a logit per head [Hq] in
    the softmax, dropped after it), explicit as eager attention; [1, Hq, n, D]."""
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v


def _stretch_attention(q, k, v, prompt, stretch, pos, *, scale, window, softcap, sinks, p, gqa):
    """Stretch ``(a, b, g, plen)`` (``wrpo.data.batch.segment_layout``): its query/key/value pieces
    [1, H, b - a, D], ``prompt`` the (query, key, value) pieces of its group's first ``plen`` tokens,
    ``pos`` the row's positions -> its output [1, Hq, b - a, D]."""
    a, b, g, plen = stretch
    if plen:  # a response after a shared prompt: keys and values of the prompt, then its own
        k, v = torch.cat([prompt[1], k], dim=2), torch.cat([prompt[2], v], dim=2)
    windowed = window is not None and plen + b - a > window
    if not windowed and softcap is None and sinks is None:
        sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=p, scale=scale, enable_gqa=gqa)
        if not plen:
            return sdpa(q, k, v, is_causal=True)
        if plen < b - a:  # short prompt: its queries again in front, one causal call (cheaper than a mask)
            return sdpa(torch.cat([prompt[0], q], dim=2), k, v, is_causal=True)[:, :, plen:]
        n = torch.arange(plen + b - a, device=q.device)  # causal aligned to the bottom right
        return sdpa(q, k, v, attn_mask=_visible(n[plen:], n, None))
    k_pos = torch.cat([pos[g : g + plen], pos[a:b]]) if plen else pos[a:b]
    visible = _visible(pos[a:b], k_pos, window)
    if softcap is not None or sinks is not None:
        return _explicit_attention(q, k, v, visible, scale, softcap, sinks, p, gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, dropout_p=p, scale=scale, enable_gqa=gqa
    )


def _row_attention(q, k, v, stretches, pos, options) -> torch.Tensor:
    """One row: q [1, Hq, L, D], k/v [1, Hkv, L, D] -> [1, Hq, L, D], stretch by stretch.

    The row is split once into its stretches (autograd joins their gradients with one cat; slicing the
    row per stretch would zero-fill a row-sized gradient for every slice)."""
    sizes = [st[1] - st[0] for st in stretches]  # split_with_sizes: one backward node (tensor_split slices)
    pieces = list(zip(*(t.split(sizes, dim=2) for t in (q, k, v)), strict=True))
    first_piece = {st[0]: i for i, st in enumerate(stretches)}
    out = []
    for (qi, ki, vi), st in zip(pieces, stretches, strict=True):
        plen = st[3]
        prompt = tuple(t[:, :, :plen] for t in pieces[first_piece[st[2]]]) if plen else None
        out.append(_stretch_attention(qi, ki, vi, prompt, st, pos, **options))
    return torch.cat(out, dim=2)


def segment_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs
):
    """query [R, Hq, L, D], key/value [R, Hkv, L, D] -> (output [R, L, Hq, D], None).

    Each sequence attends causally to itself only (a shared-prefix response: to its prompt and
    causally to itself, see ``wrpo.data.batch.segment_layout``), within the layer's ``sliding_window`` if any,
    with ``softcap`` applied to the scores if given. ``attention_mask`` must be None: padding inside a
    row is its own sequence (position ids restarting at 0), and its outputs are ignored by the loss.
    """
    if attention_mask is not None:
        raise ValueError(
            f"{NAME} attention takes packed rows separated by position_ids, not an attention_mask "
            f"(got one of shape {tuple(attention_mask.shape)}); for padded batches or generation use "
            "model.set_attn_implementation('sdpa')"
        )
    if position_ids is None:  # a layer that does not hand them on (Llama-4): its decoder layer's
        from wrpo.model.mixers import current_position_ids

        position_ids = current_position_ids()
    if position_ids is None:
        raise ValueError(f"{NAME} attention needs position_ids [rows, L] to find the packed sequences")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{NAME} attention runs whole packed rows (query length {query.shape[2]} != key length "
            f"{key.shape[2]}: a KV cache?); generate with model.set_attn_implementation('sdpa')"
        )
    unknown = sorted(k for k, v in kwargs.items() if k not in HANDLED and v is not None and v is not False)
    if unknown:
        raise ValueError(
            f"{NAME} attention does not apply {', '.join(unknown)} (passed by "
            f"{type(module).__name__}); run this model unpacked with its own attention implementation"
        )
    options = {
        "scale": scaling,
        "window": kwargs.get("sliding_window"),
        "softcap": kwargs.get("softcap"),
        "sinks": kwargs.get("s_aux"),
        "p": dropout if module.training else 0.0,
        "gqa": key.shape[1] != query.shape[1],  # grouped-query attention: each key/value head shared
    }
    bounds = stretches_of(position_ids)
    if len(bounds) == 1:  # one row of positions shared by every row of the batch
        bounds = bounds * query.shape[0]
    if len(bounds) != query.shape[0]:
        raise ValueError(f"position_ids has {len(bounds)} rows for a batch of {query.shape[0]} rows")
    rows = zip(query.split(1), key.split(1), value.split(1), bounds, strict=True)
    out = [
        _row_attention(q, k, v, stretches, position_ids[min(r, position_ids.shape[0] - 1)], options)
        for r, (q, k, v, stretches) in enumerate(rows)
    ]
    return torch.cat(out, dim=0).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, segment_attention)
