"""wrpo.model.attention: per-sequence sdpa over packed rows against sdpa with the dense block mask."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import sizes, tiny_model
from transformers import LlamaForCausalLM

from wrpo.data.batch import segment_bounds
from wrpo.model.attention import NAME, segment_attention
from wrpo.model.body import varlen_attention
from wrpo.model.masks import block_causal_mask
from wrpo.train.load_models import _attn_implementation


def packed_positions(rows: list[list[int]]) -> torch.Tensor:
    """Sequence lengths per row -> [R, L] position ids restarting per sequence, the rest padding."""
    L = max(sum(r) for r in rows)
    pos = []
    for lengths in rows:
        p = [i for n in lengths for i in range(n)]
        pos.append(p + list(range(L - len(p))))
    return torch.tensor(pos)


def tiny_llama(impl: str, kv_heads: int = 2) -> LlamaForCausalLM:
    model = tiny_model(
        "llama",
        vocab_size=97,
        **sizes(32, 48, 2, 4, kv_heads),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model.set_attn_implementation(impl)
    return model


def test_segment_bounds_split_where_positions_restart():
    pos = packed_positions([[3, 4, 1], [5, 2]])  # row 1 ends in 1 padding token, its own segment
    assert segment_bounds(pos) == [[(0, 3), (3, 7), (7, 8)], [(0, 5), (5, 7), (7, 8)]]
    with pytest.raises(ValueError, match=r"position_ids must be \[rows, L\]"):
        segment_bounds(pos[0])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_model_matches_block_mask_sdpa(kv_heads):
    """Logits and every parameter gradient equal the dense block-mask path (fp64), GQA included."""
    pos = packed_positions([[5, 9, 3], [7, 1, 6, 2], [11]])
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(1))
    out = {}
    for impl in ("sdpa", NAME):
        model = tiny_llama(impl, kv_heads)
        kw = {"attention_mask": block_causal_mask(pos, torch.float64)} if impl == "sdpa" else {}
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits
        (logits * torch.linspace(-1, 1, 97, dtype=torch.float64)).sum().backward()
        out[impl] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (ref, ref_grads), (got, got_grads) = out["sdpa"], out[NAME]
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-9, atol=1e-10), name


def test_sequences_do_not_see_each_other():
    """Changing the tokens of one sequence leaves the outputs of the others unchanged."""
    model = tiny_llama(NAME)
    pos = packed_positions([[6, 5, 4]])
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(2))
    other = ids.clone()
    other[0, 6:11] = (other[0, 6:11] + 1) % 97
    a = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    b = model(input_ids=other, position_ids=pos, use_cache=False).logits
    assert torch.equal(a[0, :6], b[0, :6]) and torch.equal(a[0, 11:], b[0, 11:])
    assert not torch.allclose(a[0, 6:11], b[0, 6:11])


def test_bad_inputs_are_named():
    q = torch.randn(1, 2, 5, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="needs position_ids"):
        segment_attention(module, q, q, q, None)
    with pytest.raises(ValueError, match=r"not an attention_mask \(got one of shape \(1, 1, 5, 5\)\)"):
        segment_attention(module, q, q, q, torch.zeros(1, 1, 5, 5), position_ids=torch.arange(5)[None])
    cached = torch.randn(1, 2, 9, 4)  # decoding with a KV cache: 1 new query against 9 keys
    with pytest.raises(ValueError, match=r"query length 1 != key length 9: a KV cache\?"):
        segment_attention(module, q[:, :, :1], cached, cached, None, position_ids=torch.tensor([[8]]))


def test_wrpo_picks_segment_attention_for_packed_rows_without_flash_attn():
    """Loaded with the model's default; the layout plan switches packed rows to wrpo_segments."""
    from wrpo.model.capabilities import read_capabilities
    from wrpo.model.layout import plan_layout

    if torch.cuda.is_available():
        pytest.skip("on a GPU with flash-attn installed, flash-attention is picked")
    assert _attn_implementation(packing=None) is None and _attn_implementation(packing=False) is None
    plan = plan_layout(read_capabilities(tiny_llama("sdpa")), packing=None, prefix_sharing=False)
    assert plan.packing and plan.attention == NAME and plan.row_per_group
    assert varlen_attention(tiny_llama(NAME)) and not varlen_attention(tiny_llama("sdpa"))


def test_bounds_are_found_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids tensor: one host sync per forward, not one per layer."""
    import wrpo.data.batch as batch_layout

    calls = []
    real = batch_layout.segment_bounds
    monkeypatch.setattr(batch_layout, "segment_bounds", lambda pos: calls.append(1) or real(pos))
    model = tiny_llama(NAME)  # 2 layers
    pos = packed_positions([[4, 6]])
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(3))
    first = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert len(calls) == 1
    pos[0, 4:] = torch.arange(6)  # the same tensor changed in place: bounds are recomputed
    pos[0, 2:] = torch.arange(8)
    second = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert len(calls) == 2
    assert torch.equal(first[0, :2], second[0, :2]) and not torch.allclose(first[0, 2:4], second[0, 2:4])
