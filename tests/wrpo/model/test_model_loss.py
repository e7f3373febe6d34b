"""``wrpo.preference_loss`` / ``wrpo.sequence_logps`` against the model's own logits, in fp64.

The model's forward applies its logit transform (Gemma's soft cap, Cohere's logit scale, Granite's
logits scaling); the model-level entry must read the same transform from the config and give the
log-probs and loss of the model's real logits. Also: wrappers are seen through, the model's own
``forward`` is restored afterwards, and a model with no LM head gets a clear error. Packed batches
whose sequences would attend to each other (no position ids, positions that do not restart per
sequence, flash-attention over several rows) are refused; every supported packed path gives the
padded loss.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import random_groups
from helpers.tiny_models import LLAMA_2x32, tiny_model

from wrpo import head_transform, pack_groups, pad_groups, preference_loss, sequence_logps, sft_loss
from wrpo.model.losses import causal_lm
from wrpo_kernels import wrpo_loss

VOCAB, K = 48, 3
SMALL = {"vocab_size": VOCAB, **LLAMA_2x32, "head_dim": 8}

# Packed rows equal the padded model up to the fp32 steps inside some models: Gemma 2 (no sdpa here)
# takes the eager attention's softmax in fp32, Cohere its LayerNorm. The padded layout runs the very
# same ops as the naive path and must agree to fp64 rounding.
MODELS = {  # name: (family of helpers.tiny_models, its options)
    "llama": ("llama", {"attn_implementation": "sdpa"}),
    "gemma2-softcap": ("gemma2", {"final_logit_softcapping": 0.7, "attn_implementation": "eager"}),
    "cohere-logit-scale": ("cohere", {"logit_scale": 3.5, "attn_implementation": "sdpa"}),
    "granite-logits-scaling": ("granite", {"logits_scaling": 0.4, "attn_implementation": "sdpa"}),
}
PACKED_TOL = {"gemma2-softcap": 1e-7, "cohere-logit-scale": 1e-7}


def build(name, seed=0):
    family, extra = MODELS[name]
    model = tiny_model(family, seed=seed, **SMALL, **extra)
    with torch.no_grad():  # heads initialised near 0 give near-uniform logits: spread them out
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def groups(seed=1, B=3):
    return random_groups(B, K, VOCAB, seed=seed, prompt=(1, 6), response=(1, 7))


def naive_logps(model, feats):
    """[B, K] summed log-probs and token counts from the model's full logits (padded, one per row)."""
    batch = pad_groups(feats, pad_token_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    valid = labels != -100
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (picked * valid).sum(1).view(-1, K), valid.sum(1).view(-1, K)


@pytest.mark.parametrize("name", list(MODELS))
def test_head_transform_is_read_from_the_config(name):
    softcap, temperature = head_transform(build(name).config)
    expected = {
        "llama": (None, 1.0),
        "gemma2-softcap": (0.7, 1.0),
        "cohere-logit-scale": (None, 1 / 3.5),
        "granite-logits-scaling": (None, 0.4),
    }[name]
    assert softcap == expected[0]
    assert temperature == pytest.approx(expected[1], rel=1e-15)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_logps_equal_the_models_own_logits(name, layout):
    model, feats = build(name), groups()
    expected, _ = naive_logps(model, feats)
    batch = pad_groups(feats, 0) if layout == "padded" else pack_groups(feats, row_per_group=True)
    ours = sequence_logps(model, batch, backend="torch").view(-1, K)
    tol = PACKED_TOL.get(name, 1e-10) if layout == "packed" else 1e-10
    torch.testing.assert_close(ours, expected, rtol=tol, atol=0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
@pytest.mark.parametrize("name", list(MODELS))
def test_preference_loss_and_gradients_equal_the_naive_path(name, loss_type, layout):
    feats = groups(seed=2)
    opts = {"loss_type": loss_type, "beta": 0.4, "alpha": 0.3, "num_chosen": K - 1}
    naive = build(name)
    logps, lengths = naive_logps(naive, feats)
    ref = torch.tensor([f["ref_logps"] for f in feats], dtype=torch.float64)
    loss, _ = wrpo_loss(logps, ref, lengths, backend="reference", **opts)
    loss.backward()

    ours = build(name)
    batch = pad_groups(feats, 0) if layout == "padded" else pack_groups(feats, row_per_group=True)
    out = preference_loss(ours, batch, ref_logps=ref, backend="torch", **opts)
    out.loss.backward()
    tol = PACKED_TOL.get(name, 1e-10) if layout == "packed" else 1e-10
    torch.testing.assert_close(out.loss, loss, rtol=tol, atol=0)
    for (n, p), q in zip(ours.named_parameters(), naive.parameters(), strict=True):
        err = (p.grad - q.grad).norm() / q.grad.norm()
        assert err <= 10 * tol, f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sft_loss_and_gradients_equal_the_naive_path(name, layout):
    """The single-pass SFT loss: the mean NLL of the responses' tokens from the model's full logits."""
    feats = [{**f, "responses": f["responses"][:1], "num_chosen": 1} for f in groups(seed=3)]
    naive = build(name)
    batch = pad_groups(feats, pad_token_id=0)
    logits = naive(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["labels"] != -100
    picked = logits.log_softmax(-1).gather(-1, batch["labels"].clamp_min(0)[..., None]).squeeze(-1) * valid
    expected = -picked.sum() / valid.sum()
    expected.backward()

    ours = build(name)
    batch = pad_groups(feats, 0) if layout == "padded" else pack_groups(feats, row_per_group=True)
    loss, logps = sft_loss(ours, batch, backend="torch")
    loss.backward()
    tol = PACKED_TOL.get(name, 1e-10) if layout == "packed" else 1e-10
    torch.testing.assert_close(loss, expected, rtol=tol, atol=0)
    torch.testing.assert_close(logps, picked.sum(1).detach(), rtol=tol, atol=0)
    for (n, p), q in zip(ours.named_parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=max(tol, 1e-9), atol=1e-12, msg=n)


def test_an_explicit_temperature_multiplies_the_models_scaling():
    model, feats = build("cohere-logit-scale"), groups()
    batch = pad_groups(feats, 0)
    plain = sequence_logps(model, batch, backend="torch")
    hotter = sequence_logps(model, batch, backend="torch", temperature=2.0)
    # logits * 3.5 / 2 equals a model scaling by 1.75
    model.config.logit_scale = 1.75
    torch.testing.assert_close(hotter, sequence_logps(model, batch, backend="torch"), rtol=1e-12, atol=0)
    assert (hotter - plain).abs().max() > 1e-3


def test_ref_logps_are_taken_from_the_batch_when_not_given():
    model, feats = build("llama"), groups()
    batch = pack_groups(feats, row_per_group=True)
    a = preference_loss(model, batch, backend="torch", beta=0.3).loss
    b = preference_loss(model, batch, ref_logps=batch["ref_logps"], backend="torch", beta=0.3).loss
    shifted = batch["ref_logps"] + torch.tensor([0.0, 0.0, 1.0])  # the rejected one only
    c = preference_loss(model, batch, ref_logps=shifted, backend="torch", beta=0.3).loss
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_forward_is_restored_even_when_the_loss_raises():
    model, feats = build("llama"), groups()
    own = model.forward
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(model, pad_groups(feats, 0), loss_type="nope")
    assert "forward" not in vars(model) and model.forward == own
    assert model(input_ids=torch.tensor([[3, 4]])).logits.shape == (1, 2, VOCAB)


def test_wrappers_are_seen_through():
    model = build("llama")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert causal_lm(Wrapper(Wrapper(model))) is model
    feats = groups()
    batch = pad_groups(feats, 0)
    torch.testing.assert_close(
        sequence_logps(Wrapper(model), batch, backend="torch"), sequence_logps(model, batch, backend="torch")
    )
    with pytest.raises(TypeError, match="PreTrainedModel"):
        causal_lm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("packing", [False, True])
def test_unshifted_labels_are_refused(packing):
    """A collated batch whose labels were replaced by its input_ids (as transformers models take them)."""
    model = tiny_model("llama", **SMALL)
    groups = [{"prompt_ids": [3, 4, 5], "responses": [[6, 7], [8], [9, 10, 11]], "num_chosen": 2}]
    batch = pack_groups(groups) if packing else pad_groups(groups, pad_token_id=0)
    ref_logps = torch.zeros(1, 3, dtype=torch.float64)
    preference_loss(model, batch, ref_logps=ref_logps)  # shifted: accepted
    batch["labels"] = batch["input_ids"].clone()
    if not packing:
        batch["labels"][batch["attention_mask"] == 0] = -100
    with pytest.raises(ValueError, match=r"is the last position of sequence \d .*the labels look unshifted"):
        preference_loss(model, batch, ref_logps=ref_logps)
    with pytest.raises(ValueError, match=r"the labels look unshifted"):
        sequence_logps(model, batch)


def test_a_model_without_lm_head_is_refused():
    config = transformers.LlamaConfig(**SMALL)
    with pytest.raises(TypeError, match="no LM head"):
        causal_lm(transformers.LlamaModel(config))


def test_softcap_and_scaling_together_are_refused():
    config = transformers.Gemma2Config(**SMALL, final_logit_softcapping=5.0)
    config.logit_scale = 2.0
    with pytest.raises(NotImplementedError, match="soft"):
        head_transform(config)


def test_a_compiled_model_gives_the_eager_loss_and_gradients():
    """``torch.compile(model)`` (aot_eager): the body is compiled, the fused loss is a compile boundary."""
    compiled, eager = build("llama"), build("llama")
    wrapped = torch.compile(compiled, backend="aot_eager")
    assert causal_lm(wrapped) is compiled
    for seed in (10, 11):  # two batch shapes: recompiled or dynamic, never wrong
        batch = pack_groups(groups(seed=seed), row_per_group=True)
        a = preference_loss(wrapped, batch, backend="torch", beta=0.3)
        b = preference_loss(eager, batch, backend="torch", beta=0.3)
        a.loss.backward()
        b.loss.backward()
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=n)
    assert "forward" not in vars(compiled)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"output_multiplier": 4.0}, 0.25),
        ({"lm_head_multiplier": 0.5}, 2.0),
        ({"logits_scaling": 8.0}, 8.0),
        ({"logits_scaling": 8.0, "model_type": "hyperclovax"}, 0.125),
        ({"logit_scale": 1.0}, 1.0),
    ],
)
def test_other_logit_multipliers_become_a_temperature(fields, expected):
    config = transformers.LlamaConfig(**SMALL)
    for k, v in fields.items():
        setattr(config, k, v)
    assert head_transform(config) == (None, pytest.approx(expected, rel=1e-15))


# ---- packed sequences must not attend to each other ------------------------------------------------------


@pytest.mark.parametrize("row_per_group", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "eager", "wrpo_segments"])
def test_every_supported_packed_path_gives_the_padded_loss(impl, row_per_group):
    """One row or one row per group; per-sequence attention or the block mask built for sdpa/eager."""
    import wrpo.model.attention  # noqa: F401  (registers wrpo_segments)

    model, feats = build("llama"), groups(seed=3)
    padded = preference_loss(model, pad_groups(feats, 0), backend="torch", beta=0.3).loss
    model.set_attn_implementation(impl)
    batch = pack_groups(feats, row_per_group=row_per_group)
    packed = preference_loss(model, batch, backend="torch", beta=0.3).loss
    tol = 1e-6 if impl == "eager" else 1e-10  # eager attention takes its softmax in fp32
    torch.testing.assert_close(packed, padded, rtol=tol, atol=0)


def test_packed_sequences_without_position_ids_would_attend_to_each_other():
    """Why the checks below exist: one packed row run with positions that do not restart gives other
    hidden states (and so another loss) for every sequence after the first."""
    model, feats = build("llama"), groups(seed=4)
    batch = pack_groups(feats[:1])
    ids, pos = batch["input_ids"], batch["position_ids"]
    body = model.model
    separated = body(input_ids=ids, position_ids=pos, attention_mask=block_mask(pos)).last_hidden_state
    leaked = body(input_ids=ids).last_hidden_state  # causal over the whole row
    first = int(batch["cu_seqlens"][1])
    torch.testing.assert_close(leaked[:, :first], separated[:, :first], rtol=1e-10, atol=1e-12)
    assert (leaked[:, first:] - separated[:, first:]).abs().max() > 1e-2


def block_mask(pos):
    from wrpo.model.masks import block_causal_mask

    return block_causal_mask(pos, torch.float64)


@pytest.mark.parametrize("entry", ["preference_loss", "sequence_logps"])
def test_a_packed_batch_without_position_ids_is_refused(entry):
    model, feats = build("llama"), groups()
    fn = preference_loss if entry == "preference_loss" else sequence_logps
    for row_per_group in (False, True):
        batch = pack_groups(feats, row_per_group=row_per_group)
        del batch["position_ids"]
        with pytest.raises(ValueError, match="without position_ids: its sequences would attend"):
            fn(model, batch, backend="torch")
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # a 2D mask does not separate them
        with pytest.raises(ValueError, match="without position_ids"):
            fn(model, batch, backend="torch")
    assert "forward" not in vars(model)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "wrpo_segments"])
def test_positions_that_do_not_restart_per_sequence_are_refused(impl):
    import wrpo.model.attention  # noqa: F401

    model, feats = build("llama"), groups()
    model.set_attn_implementation(impl)
    # hand-built batches (no recorded "layout"): the collator's layout is what the body would trust
    batch = pack_groups(feats, row_per_group=True)
    del batch["layout"]
    R, L = batch["input_ids"].shape
    batch["position_ids"] = torch.arange(L).expand(R, L)  # one sequence per row, as far as attention sees
    with pytest.raises(ValueError, match=r"do not restart at 0 where sequence 1 starts"):
        preference_loss(model, batch, backend="torch")
    batch = pack_groups(feats)
    del batch["layout"]
    batch["position_ids"][0, int(batch["cu_seqlens"][4])] = 7  # one start missed (group 1, response 1)
    with pytest.raises(ValueError, match=r"where sequence 4 starts"):
        sequence_logps(model, batch, backend="torch")


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_with_several_packed_rows_is_refused(impl):
    """transformers' flash path reads position ids as varlen bounds only for a batch of one row; with
    more rows it runs each row causally as one sequence. Refused before the body runs (no flash-attn
    needed here)."""
    model, feats = build("llama"), groups()
    model.config._attn_implementation = impl
    with pytest.raises(ValueError, match="only in a batch of one row"):
        preference_loss(model, pack_groups(feats, row_per_group=True), backend="torch")
    with pytest.raises(ValueError, match="only in a batch of one row"):
        sequence_logps(model, pack_groups(feats, row_per_group=True, pad_token_id=0), backend="torch")
