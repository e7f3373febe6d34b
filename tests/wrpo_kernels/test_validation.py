"""Bad inputs raise ValueError naming the problem (TypeError for a module where its weight goes); the
nn.Module wrappers behave like the functions."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, assert_rel_close, make_batch

from wrpo_kernels import (
    FusedLinearWRPOLoss,
    LinearLogprobs,
    fused_linear_wrpo_loss,
    linear_logprobs,
    wrpo_loss,
)


@pytest.fixture
def batch():
    return make_batch(B=2, K=3, H=4, V=11, seed=0, min_len=2, max_len=4, with_bias=True)


def fused_kwargs(batch, **over):
    kw = {
        "hidden": batch.hidden,
        "weight": batch.weight,
        "labels": batch.labels,
        "cu_seqlens": batch.cu_seqlens,
        "ref_logps": batch.ref_logps,
        "bias": batch.bias,
        "beta": 0.1,
    }
    kw.update(over)
    return kw


def call_fused(batch, **over):
    kw = fused_kwargs(batch, **over)
    return fused_linear_wrpo_loss(
        kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), kw.pop("cu_seqlens"), backend="torch", **kw
    )


def call_logprobs(batch, **over):
    kw = fused_kwargs(batch, **over)
    kw.pop("ref_logps"), kw.pop("beta")
    return linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), kw.pop("cu_seqlens"), **kw)


def integer_head(b):
    return {"hidden": b.hidden.long(), "weight": b.weight.long(), "bias": None}


# both entry points share the head checks
ENTRY_POINTS = [call_fused, call_logprobs]


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda b: {"weight": b.weight[:, :3]}, r"weight must be \[V, H\] with H=4"),
        (lambda b: {"weight": b.weight.float()}, r"weight dtype torch.float32 differs from hidden dtype"),
        (lambda b: {"bias": b.bias[:-1]}, r"bias must be \[V\] = \[11\]"),
        (lambda b: {"bias": b.bias.float()}, r"bias is torch.float32"),
        (lambda b: {"labels": b.labels[:-1]}, r"labels must have shape"),
        (lambda b: {"labels": b.labels.double()}, r"labels must be an integer tensor"),
        (lambda b: integer_head(b), r"hidden must be a floating tensor, got torch.int64"),
        (lambda b: {"hidden": b.hidden[0]}, r"hidden must be \[N, H\] packed rows or \[S, T, H\]"),
        (lambda b: {"cu_seqlens": b.cu_seqlens + 1}, r"cu_seqlens must start at 0 and end at N="),
        (lambda b: {"cu_seqlens": torch.cat([b.cu_seqlens[:-1], b.cu_seqlens[-1:] - 1])}, r"end at N="),
        (lambda b: {"cu_seqlens": b.cu_seqlens.double()}, r"cu_seqlens must be a 1-D integer tensor"),
        (lambda b: {"cu_seqlens": b.cu_seqlens[None]}, r"cu_seqlens must be a 1-D integer tensor"),
    ],
    ids=[
        "H-mismatch",
        "dtype-mismatch",
        "bias-shape",
        "bias-dtype",
        "labels-shape",
        "float-labels",
        "int-hidden",
        "1d-hidden",
        "cu-not-from-0",
        "cu-not-to-N",
        "float-cu",
        "2d-cu",
    ],
)
def test_bad_head_inputs_raise(call, make_bad, match, batch):
    with pytest.raises(ValueError, match=match):
        call(batch, **make_bad(batch))


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_decreasing_cu_seqlens_raises(call, batch):
    cu = batch.cu_seqlens.clone()
    cu[2], cu[3] = cu[3].item(), cu[2].item()  # swap two inner bounds -> decreasing at index 3
    assert cu[0] == 0 and cu[-1] == batch.N
    with pytest.raises(ValueError, match=r"non-decreasing: cu_seqlens\[3\]=\d+ < cu_seqlens\[2\]"):
        call(batch, cu_seqlens=cu)


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
@pytest.mark.parametrize("bad_label", [11, 1000, -1, -7])
def test_out_of_range_label_names_its_token(call, bad_label, batch):
    labels = batch.labels.clone()
    labels[5] = bad_label
    with pytest.raises(ValueError, match=rf"labels\[5\] = {bad_label} is outside \[0, 11\)"):
        call(batch, labels=labels)


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_unshifted_labels_are_refused_with_the_shift(call, batch):
    """labels = input_ids (as transformers models take them) label every sequence's last position."""
    cu = batch.cu_seqlens.tolist()
    labels = batch.labels.clone()
    labels[cu[4] - 1] = 3  # the last position of sequence 3
    with pytest.raises(
        ValueError,
        match=rf"labels\[{cu[4] - 1}\] = 3 is the last position of sequence 3 "
        r"(\(group 1, response 0 of 3, chosen\) )?and is labelled: the labels look unshifted.*"
        r"labels\[t\] = input_ids\[t\+1\]",
    ):
        call(batch, labels=labels)


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_unshifted_padded_labels_are_refused(call, batch):
    """Padded [S, T, H]: a sequence that fills its row ends on a labelled position."""
    hidden, labels = batch.padded()
    longest = max(batch.seqlens)
    s = batch.seqlens.index(longest)
    labels[s, longest - 1] = 2
    with pytest.raises(ValueError, match=rf"last position of sequence {s}.*unshifted"):
        call(batch, hidden=hidden, labels=labels, cu_seqlens=None)


def test_ignore_index_labels_are_accepted(batch):
    labels = batch.labels.clone()
    labels[1] = IGNORE
    call_fused(batch, labels=labels)
    call_logprobs(batch, labels=labels, reduction="mean")


def test_sequence_without_valid_label_is_named_in_fused_loss(batch):
    cu = batch.cu_seqlens.tolist()
    labels = batch.labels.clone()
    labels[cu[4] : cu[5]] = IGNORE
    with pytest.raises(ValueError, match=r"sequence 4 \(group 1, response 1 of 3, chosen\) has no label"):
        call_fused(batch, labels=labels)
    labels = batch.labels.clone()
    labels[cu[2] : cu[3]] = IGNORE
    with pytest.raises(ValueError, match=r"sequence 2 \(group 0, response 2 of 3, rejected\) has no label"):
        call_fused(batch, labels=labels)


def test_mean_reduction_with_empty_sequence_raises(batch):
    cu = batch.cu_seqlens.tolist()
    labels = batch.labels.clone()
    labels[cu[3] : cu[4]] = IGNORE
    with pytest.raises(ValueError, match=r"sequence 3 has no label != ignore_index"):
        call_logprobs(batch, labels=labels, reduction="mean")
    # "sum" and "none" accept it
    assert call_logprobs(batch, labels=labels, reduction="sum")[3].item() == 0.0
    call_logprobs(batch, labels=labels, reduction="none")


def test_bad_reduction_raises(batch):
    with pytest.raises(ValueError, match=r"reduction='avg' is not one of"):
        call_logprobs(batch, reduction="avg")


def test_sequence_count_not_divisible_by_k_raises(batch):
    with pytest.raises(ValueError, match=r"S=6 sequences, not a multiple of responses_per_prompt=4"):
        call_fused(batch, responses_per_prompt=4, num_chosen=2)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_missing_ref_logps_raises_for_dpo_and_ipo(loss_type, batch):
    with pytest.raises(ValueError, match=rf"loss_type='{loss_type}' needs ref_logps"):
        call_fused(batch, ref_logps=None, loss_type=loss_type)
    with pytest.raises(ValueError, match=rf"loss_type='{loss_type}' needs ref_logps"):
        wrpo_loss(batch.ref_logps, None, batch.counts.view(2, 3), loss_type=loss_type)


def test_simpo_works_without_ref_logps(batch):
    out = call_fused(batch, ref_logps=None, loss_type="simpo")
    assert torch.isfinite(out.loss)
    loss, _ = wrpo_loss(batch.ref_logps, None, batch.counts.view(2, 3), loss_type="simpo")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("shape", [(3, 2), (2, 4), (5,), (2, 3, 1)])
def test_ref_logps_wrong_shape_raises(shape, batch):
    bad = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ref_logps must be \[B, K\] = \[2, 3\] or \[S\] = \[6\]"):
        call_fused(batch, ref_logps=bad)
    with pytest.raises(ValueError, match=r"ref_logps must be \[B, K\] = \[2, 3\]"):
        wrpo_loss(batch.ref_logps, bad, None)


def test_integer_ref_logps_raises(batch):
    with pytest.raises(ValueError, match=r"ref_logps must be a floating tensor"):
        call_fused(batch, ref_logps=torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_unknown_backend_raises(call, batch):
    with pytest.raises(ValueError, match=r"backend='cuda' is not available"):
        kw = fused_kwargs(batch)
        if call is call_fused:
            fused_linear_wrpo_loss(
                kw.pop("hidden"),
                kw.pop("weight"),
                kw.pop("labels"),
                kw.pop("cu_seqlens"),
                backend="cuda",
                **kw,
            )
        else:
            linear_logprobs(batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, backend="cuda")


def test_unknown_backend_raises_in_wrpo_loss(batch):
    with pytest.raises(ValueError, match=r"backend='triton!' is not available"):
        wrpo_loss(batch.ref_logps, batch.ref_logps, None, backend="triton!")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"loss_type": "kto"}, r"loss_type='kto' is not one of"),
        ({"num_chosen": 3}, r"num_chosen must be an int in \[1, 2\] for 3 responses, got 3"),
        ({"num_chosen": 0}, r"num_chosen must be an int in \[1, 2\]"),
        ({"chosen_weights": [1.0]}, r"chosen_weights has 1 entries but num_chosen=2"),
        ({"chosen_weights": [0.2, 0.3, 0.5]}, r"chosen_weights has 3 entries but num_chosen=2"),
        ({"chosen_weights": [0.5, 0.6]}, r"chosen_weights must sum to 1"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, r"label_smoothing applies to .* not to ipo"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"beta": 0.0}, r"beta must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ],
    ids=[
        "loss_type",
        "num_chosen-high",
        "num_chosen-0",
        "weights-short",
        "weights-long",
        "weights-sum",
        "ipo-smoothing",
        "smoothing-0.5",
        "beta-0",
        "alpha-1.5",
    ],
)
def test_bad_loss_options_raise(options, match, batch):
    with pytest.raises(ValueError, match=match):
        call_fused(batch, **options)
    with pytest.raises(ValueError, match=match):
        wrpo_loss(batch.ref_logps, batch.ref_logps, batch.counts.view(2, 3), **options)


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"softcap": 0.0}, r"softcap must be > 0"),
        ({"softcap": -2.0}, r"softcap must be > 0"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
        ({"temperature": -1.0}, r"temperature must be > 0"),
        ({"chunk_tokens": 0}, r"chunk_tokens must be a positive int"),
        ({"chunk_tokens": -2}, r"chunk_tokens must be a positive int"),
        ({"chunk_tokens": 2.5}, r"chunk_tokens must be a positive int"),
    ],
)
def test_bad_head_options_raise(call, options, match, batch):
    with pytest.raises(ValueError, match=match):
        call(batch, **options)


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_padded_input_with_cu_seqlens_names_both_layouts(call, batch):
    hp, lp = batch.padded()
    with pytest.raises(ValueError, match=r"hidden is 3-D \(6, \d+, 4\) but cu_seqlens was given") as err:
        call(batch, hidden=hp, labels=lp)
    msg = str(err.value)
    assert "packed rows, hidden [N, H] and labels [N]" in msg and "cu_seqlens [S+1]" in msg
    assert "hidden.reshape(-1, 4)" in msg and "cu_seqlens=None" in msg


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_a_packed_batch_with_a_batch_dim_gets_the_flattening_hint(call, batch):
    """A [1, N, H] model output with [N] labels: the layout error, not a labels-shape one."""
    with pytest.raises(ValueError, match=r"flatten it: hidden.reshape\(-1, 4\) and labels.reshape\(-1\)"):
        call(batch, hidden=batch.hidden[None])
    # flattened as the message says, it runs
    call(batch, hidden=batch.hidden[None].reshape(-1, 4))


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=["fused", "logprobs"])
def test_a_module_instead_of_its_weight_is_refused(call, batch):
    lm_head = torch.nn.Linear(batch.H, batch.V, dtype=batch.hidden.dtype)
    with pytest.raises(TypeError, match=r"weight is a module \(Linear\).*pass `lm_head.weight`"):
        call(batch, weight=lm_head)
    with pytest.raises(TypeError, match=r"bias is a module \(Linear\).*pass `lm_head.bias`"):
        call(batch, weight=lm_head.weight.detach(), bias=lm_head)
    call(batch, weight=lm_head.weight.detach(), bias=lm_head.bias.detach())  # as the message says


def test_a_module_is_refused_by_the_module_wrapper_too(batch):
    lm_head = torch.nn.Linear(batch.H, batch.V, dtype=batch.hidden.dtype)
    with pytest.raises(TypeError, match=r"pass `lm_head.weight`"):
        FusedLinearWRPOLoss()(
            batch.hidden, lm_head, batch.labels, batch.cu_seqlens, ref_logps=batch.ref_logps
        )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(6), None, None), r"policy_logps must be \[B, K\], got \(6,\)"),
        ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), None), r"policy_logps must be a floating"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)), r"lengths must be \[B, K\] = \[2, 3\]"),
        (
            (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 2, 3], [4, 0, 6]])),
            r"lengths\[1, 1\] = 0",
        ),
    ],
    ids=["1d-policy", "int-policy", "lengths-shape", "zero-length"],
)
def test_bad_wrpo_loss_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        wrpo_loss(*args, loss_type="ipo")


def test_length_normalised_losses_need_lengths(batch):
    for loss_type in ("simpo", "ipo"):
        with pytest.raises(ValueError, match=rf"loss_type='{loss_type}' needs lengths"):
            wrpo_loss(batch.ref_logps, batch.ref_logps, None, loss_type=loss_type)


# ---- modules ----------------------------------------------------------------------------------------------


def test_fused_module_equals_function(batch):
    opts = {"alpha": 0.4, "beta": 0.3, "loss_type": "dpo", "chunk_tokens": 5, "nll_weight": 0.1}
    mod = FusedLinearWRPOLoss(**opts)
    got = mod(
        batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, ref_logps=batch.ref_logps, bias=batch.bias
    )
    expected = fused_linear_wrpo_loss(
        batch.hidden,
        batch.weight,
        batch.labels,
        batch.cu_seqlens,
        ref_logps=batch.ref_logps,
        bias=batch.bias,
        **opts,
    )
    assert torch.equal(got.loss, expected.loss)
    assert torch.equal(got.logps, expected.logps)
    assert set(got.metrics) == set(expected.metrics)
    assert got.metrics["cur_alpha"].item() == pytest.approx(0.4)


def test_setting_module_alpha_changes_the_result(batch):
    mod = FusedLinearWRPOLoss(alpha=0.0, beta=0.5)
    args = (batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    first = mod(*args, ref_logps=batch.ref_logps).loss
    mod.alpha = 0.9
    second = mod(*args, ref_logps=batch.ref_logps)
    expected = fused_linear_wrpo_loss(*args, ref_logps=batch.ref_logps, alpha=0.9, beta=0.5)
    assert abs(second.loss.item() - first.item()) > 1e-6
    assert_rel_close(second.loss, expected.loss, 1e-14, "loss after setting alpha")
    assert second.metrics["cur_alpha"].item() == pytest.approx(0.9)


def test_fused_module_holds_its_options():
    mod = FusedLinearWRPOLoss(beta=0.2, loss_type="simpo")
    assert mod.beta == 0.2 and mod.loss_type == "simpo"
    assert mod.alpha == 0.1 and mod.responses_per_prompt == 3 and mod.num_chosen == 2  # paper defaults
    assert "loss_type='simpo'" in repr(mod)


@pytest.mark.parametrize("cls", [FusedLinearWRPOLoss, LinearLogprobs])
def test_unknown_module_option_raises_type_error(cls):
    with pytest.raises(TypeError, match=r"unknown options \['bogus'\]"):
        cls(bogus=1)


def test_fused_module_rejects_per_call_tensors_as_options():
    with pytest.raises(TypeError, match=r"unknown options"):
        FusedLinearWRPOLoss(ref_logps=torch.zeros(2, 3))
