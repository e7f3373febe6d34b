"""The model zoo's building blocks (tests/zoo): tiny configs, skips, preference groups, the reference."""

from __future__ import annotations

import math

import pytest
import torch
from zoo.architectures import TEXT_VOCAB, VOCAB, WINDOW, build_tiny, registry_names
from zoo.reference import make_groups, own_sequence_logps, relative_error


@pytest.fixture(scope="module")
def llama():
    built = build_tiny("llama")
    assert built.skip is None and built.model is not None
    return built.model


def test_registry_names_sorted_and_complete():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = registry_names()
    assert names == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert "llama" in names and "lfm2" in names


def test_llama_builds_tiny_in_float64(llama):
    config = llama.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, VOCAB)
    assert config.initializer_range == 0.2 and config.use_cache is False
    assert all(p.dtype == torch.float64 for p in llama.parameters())
    assert not llama.training
    assert sum(p.numel() for p in llama.parameters()) < 500_000


def test_build_is_seeded():
    a, b, c = (
        build_tiny("llama", seed=0).model,
        build_tiny("llama", seed=0).model,
        build_tiny("llama", seed=1).model,
    )
    wa, wb, wc = (m.get_output_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("lfm2", {"conv", "full_attention"}),  # an override: its default is all attention
        ("qwen3_next", {"linear_attention", "full_attention"}),  # the generic layer selection
        ("gemma3_text", {"sliding_attention", "full_attention"}),
    ],
)
def test_hybrids_keep_each_layer_kind(name, kinds):
    built = build_tiny(name)
    assert built.model is not None, built.skip
    config = built.model.config
    assert set(config.layer_types) == kinds
    assert config.num_hidden_layers == len(config.layer_types) <= 4
    if "sliding_attention" in kinds:
        assert config.sliding_window == WINDOW


@pytest.mark.parametrize("name", ["bart", "bert", "whisper"])
def test_skips_give_a_reason(name):
    built = build_tiny(name)
    assert built.model is None
    assert isinstance(built.skip, str) and built.skip.strip() and "\n" not in built.skip


def test_make_groups():
    groups = make_groups(TEXT_VOCAB, seed=3)
    assert groups == make_groups(TEXT_VOCAB, seed=3) and groups != make_groups(TEXT_VOCAB, seed=4)
    assert [len(g["prompt_ids"]) for g in groups] == [5, 9, 3]
    lengths = [len(r) for g in groups for r in g["responses"]]
    assert len(lengths) == 9 and min(lengths) == 1 and max(lengths) <= 8 and len(set(lengths)) > 1
    ids = [t for g in groups for t in g["prompt_ids"] + sum(g["responses"], [])]
    assert min(ids) >= 3 and max(ids) < TEXT_VOCAB
    assert all(g["num_chosen"] == 2 and len(g["responses"]) == 3 for g in groups)


def test_own_sequence_logps_by_hand(llama):
    groups = make_groups(TEXT_VOCAB, num_groups=2, K=2)
    got = own_sequence_logps(llama, groups)
    assert got.shape == (4,) and got.dtype == torch.float64
    # the second response of the second group, by hand
    prompt, response = groups[1]["prompt_ids"], groups[1]["responses"][1]
    ids = prompt + response
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor([ids])).logits[0]
    total = 0.0
    for t in range(len(prompt) - 1, len(ids) - 1):
        row = logits[t].tolist()
        top = max(row)
        total += row[ids[t + 1]] - top - math.log(sum(math.exp(z - top) for z in row))
    assert abs(float(got[3]) - total) < 1e-10 * abs(total)


def test_own_sequence_logps_empty_prompt(llama):
    groups = [{"prompt_ids": [], "responses": [[5], [5, 6, 7]], "num_chosen": 1}]
    got = own_sequence_logps(llama, groups)
    assert float(got[0]) == 0.0  # its one token has no position before it
    with torch.no_grad():
        logp = llama(input_ids=torch.tensor([[5, 6, 7]])).logits[0].log_softmax(-1)
    assert torch.allclose(got[1], logp[0, 6] + logp[1, 7], rtol=1e-12)


def test_relative_error():
    b = torch.tensor([-2.0, -4.0])
    assert relative_error(b, b) == 0.0
    assert relative_error(torch.tensor([-2.0, -3.0]), b) == pytest.approx(0.25)
    assert relative_error(torch.ones(1), torch.zeros(1)) == pytest.approx(1e30)
