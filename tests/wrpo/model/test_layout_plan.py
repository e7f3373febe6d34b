"""The layout plan and the model facts it reads: positions of padding, bodies found, refusals by name."""

from __future__ import annotations

import pytest
import torch
import transformers
from zoo.reference import make_groups, own_sequence_logps, relative_error

from wrpo import PreferenceCollator, sequence_logps
from wrpo.data.collate import pack_groups, pack_shared_prefix
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import plan_layout, prepare_layout

SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "initializer_range": 0.2,
}


def _model(cls, config_cls, **kw):
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, config_cls)(**{**SMALL, **kw})).double().eval()


def _uneven_groups():
    """A long group and short ones: a row per group pads the short ones by far more than they hold."""
    groups = make_groups(64, seed=5, num_groups=3)
    groups[0] = {**groups[0], "prompt_ids": list(range(3, 27)), "responses": [[5] * 14, [6] * 9, [7] * 3]}
    return groups


@pytest.mark.parametrize("pack", [pack_groups, pack_shared_prefix])
def test_padding_positions_stay_within_the_longest_sequence(pack):
    groups = _uneven_groups()
    longest = max(len(g["prompt_ids"]) + len(y) for g in groups for y in g["responses"])
    batch = pack(groups, row_per_group=True)
    assert int(batch["position_ids"].max()) == longest - 1
    shared = pack is pack_shared_prefix
    real = [
        len(g["prompt_ids"]) * (1 if shared else len(g["responses"])) + sum(map(len, g["responses"]))
        for g in groups
    ]
    assert batch["input_ids"].shape[1] - min(real) > longest  # positions 0..pad-1 would pass it


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}])
def test_rope_that_reads_the_largest_position_is_exact_in_packed_rows(rope):
    """Dynamic NTK rope rescales once a position passes max_position_embeddings: padding positions
    past the real sequences would rescale every real token of the batch."""
    model = _model("LlamaForCausalLM", "LlamaConfig", max_position_embeddings=48, rope_parameters=rope)
    groups = _uneven_groups()
    truth = own_sequence_logps(model, groups)
    prepare_layout(plan_layout(read_capabilities(model), packing=True, prefix_sharing=False), model)
    logps = sequence_logps(model, PreferenceCollator(0, row_per_group=True)(groups), backend="torch")
    assert relative_error(logps, truth) < 1e-10


def test_window_check_counts_real_lengths():
    """A dense packed mask (eager) is refused past the window only: padding does not count."""
    model = _model("MistralForCausalLM", "MistralConfig", sliding_window=40, attn_implementation="eager")
    groups = _uneven_groups()  # sequences of up to 38 tokens; the short rows pad to 73
    logps = sequence_logps(model, pack_groups(groups, row_per_group=True), backend="torch")
    assert relative_error(logps, own_sequence_logps(model, groups)) < 1e-7  # eager: softmax in fp32


def test_llama4_text_finds_its_body():
    """Llama4ForCausalLM names ``language_model`` as its base model prefix but keeps its body in
    ``model``: the body is found and the padded layout is exact. Packed rows are not (its attention
    temperature reads ``cache_position``): the plan keeps them off, saying so."""
    config = transformers.Llama4TextConfig(**{**SMALL, "num_local_experts": 2, "intermediate_size_mlp": 48})
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(config).double().eval()
    assert read_capabilities(model).body_path == "model"
    groups = make_groups(64, seed=2)
    truth = own_sequence_logps(model, groups)
    # Llama-4 computes parts in fp32 (differences ~5e-9 in fp64 between layouts)
    assert relative_error(sequence_logps(model, PreferenceCollator(0, packing=False)(groups)), truth) < 1e-7
    plan = plan_layout(read_capabilities(model), packing=None, prefix_sharing=None)
    assert not plan.packing and "packed not exact for model type 'llama4_text' (differs" in plan.packing_why
    with pytest.raises(ValueError, match="--packing: packed not exact for model type 'llama4_text'"):
        plan_layout(read_capabilities(model), packing=True, prefix_sharing=None)


def _falcon_alibi():
    config = transformers.FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        new_decoder_architecture=False,
    )
    return transformers.FalconForCausalLM(config).double().eval()


def _bloom():
    return transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    )


@pytest.mark.parametrize("build", [_falcon_alibi, _bloom], ids=["falcon-alibi", "bloom"])
def test_alibi_models_are_padded_and_packing_is_refused_by_name(build):
    model = build()
    plan = plan_layout(read_capabilities(model), packing=None, prefix_sharing=None)
    assert not plan.packing and not plan.prefix_sharing and "ALiBi" in plan.packing_why
    with pytest.raises(ValueError, match="--packing: .*ALiBi"):
        plan_layout(read_capabilities(model), packing=True, prefix_sharing=None)
    groups = make_groups(64, seed=1)
    with pytest.raises(ValueError, match="packed batch refused: .*ALiBi"):
        sequence_logps(model, PreferenceCollator(0, row_per_group=True)(groups))


def test_models_without_position_ids_are_planned_padded_with_the_reason():
    model = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2)
    )
    plan = plan_layout(read_capabilities(model), packing=None, prefix_sharing=None)
    assert not plan.packing and plan.packing_why.startswith("MambaForCausalLM takes no position_ids")
    with pytest.raises(ValueError, match="--prefix_sharing: MambaForCausalLM takes no position_ids"):
        plan_layout(read_capabilities(model), packing=None, prefix_sharing=True)


def test_unverified_model_types_stay_padded_unless_asked(monkeypatch):
    """A model type the zoo has not verified: automatic is off (why), ``packing=True`` runs it (says so)."""
    model = _model("LlamaForCausalLM", "LlamaConfig")
    monkeypatch.setattr(model.config, "model_type", "my_llama_clone")
    auto = plan_layout(read_capabilities(model), packing=None, prefix_sharing=None)
    assert not auto.packing and "not verified for model type 'my_llama_clone'" in auto.packing_why
    asked = plan_layout(read_capabilities(model), packing=True, prefix_sharing=None)
    assert asked.packing and "as asked; not verified" in asked.packing_why and not asked.prefix_sharing
