"""wrpo_loss on [B, K] log-probs, and randomized (hypothesis) parity of both public losses."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, make_batch, preference_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrpo_kernels import fused_linear_wrpo_loss, wrpo_loss

TOL64 = 1e-10
HYPOTHESIS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def run(backend, policy, ref, lengths, **opts):
    p = policy.detach().clone().requires_grad_(True)
    r = None if ref is None else ref.detach().clone().requires_grad_(True)
    loss, metrics = wrpo_loss(p, r, lengths, backend=backend, **opts)
    loss.backward()
    return loss.detach(), p.grad, None if r is None else r.grad, metrics


def check_parity(opts, policy, ref, lengths, label=""):
    ours = run("torch", policy, ref, lengths, **opts)
    expected = run("reference", policy, ref, lengths, **opts)
    assert_rel_close(ours[0], expected[0], TOL64, f"{label} loss")
    assert_rel_close(ours[1], expected[1], TOL64, f"{label} d policy")
    if expected[2] is not None:
        assert ours[2] is not None, f"{label}: no gradient for ref_logps"
        assert_rel_close(ours[2], expected[2], TOL64, f"{label} d ref")
    assert set(ours[3]) == set(expected[3]), label
    for k, v in expected[3].items():
        assert not ours[3][k].requires_grad and ours[3][k].dim() == 0, k
        assert_rel_close(ours[3][k], v, TOL64, f"{label} {k}")
    return ours


def test_dpo_needs_no_lengths_and_ignores_them():
    policy, ref, lengths = preference_inputs(3, 3, seed=2)
    a = run("torch", policy, ref, None, beta=0.1)
    b = run("torch", policy, ref, lengths, beta=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_simpo_ignores_ref_logps():
    policy, ref, lengths = preference_inputs(3, 3, seed=3)
    a = run("torch", policy, None, lengths, loss_type="simpo", beta=2.0)
    b = run("torch", policy, ref + 100.0, lengths, loss_type="simpo", beta=2.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ref_gradient_is_minus_policy_gradient():
    policy, ref, lengths = preference_inputs(3, 4, seed=4)
    for loss_type in ("dpo", "ipo"):
        _, dp, dr, _ = run("torch", policy, ref, lengths, loss_type=loss_type, num_chosen=2, beta=0.3)
        assert torch.equal(dr, -dp), loss_type


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_stay_close(dtype):
    policy, ref, lengths = preference_inputs(6, 3, seed=5)
    truth = run("reference", policy, ref, lengths, beta=0.1)
    naive = run("reference", policy.to(dtype), ref.to(dtype), lengths, beta=0.1)
    ours = run("torch", policy.to(dtype), ref.to(dtype), lengths, beta=0.1)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for i in (0, 1):
        err_ours = (ours[i].double() - truth[i]).abs().max() / truth[i].abs().max()
        err_naive = (naive[i].double() - truth[i]).abs().max() / truth[i].abs().max()
        assert err_ours <= 1.5 * err_naive + (1e-6 if dtype == torch.float32 else 1e-3)


# ---- randomized ------------------------------------------------------------------------------------------


@st.composite
def loss_settings(draw):
    K = draw(st.integers(2, 4))
    loss_type = draw(st.sampled_from(["dpo", "simpo", "ipo"]))
    return {
        "B": draw(st.integers(1, 5)),
        "K": K,
        "seed": draw(st.integers(0, 2**16)),
        "opts": {
            "num_chosen": draw(st.integers(1, K - 1)),
            "loss_type": loss_type,
            "beta": draw(st.floats(0.01, 2.0)),
            "label_smoothing": 0.0 if loss_type == "ipo" else draw(st.sampled_from([0.0, 0.1, 0.3])),
            "gamma": draw(st.sampled_from([0.0, 0.5])),
            "alpha": draw(st.floats(0.0, 1.0)),
        },
    }


@HYPOTHESIS
@given(cfg=loss_settings())
def test_randomized_wrpo_loss_matches_reference(cfg):
    policy, ref, lengths = preference_inputs(cfg["B"], cfg["K"], cfg["seed"])
    needs_ref = cfg["opts"]["loss_type"] != "simpo"
    check_parity(cfg["opts"], policy, ref if needs_ref else None, lengths, str(cfg))


@st.composite
def fused_settings(draw):
    cfg = draw(loss_settings())
    B, K = cfg["B"], cfg["K"]
    max_len = max(1, min(8, 60 // (B * K)))
    cfg.update(
        H=draw(st.integers(1, 12)),
        V=draw(st.integers(2, 50)),
        max_len=max_len,
        ignore_frac=draw(st.sampled_from([0.0, 0.3])),
        with_bias=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, 1.5])),
        temperature=draw(st.sampled_from([1.0, 0.8])),
        chunk_tokens=draw(st.sampled_from([None, 1, 3, 8, 20])),
    )
    return cfg


@HYPOTHESIS
@given(cfg=fused_settings())
def test_randomized_fused_loss_matches_reference(cfg):
    batch = make_batch(
        B=cfg["B"],
        K=cfg["K"],
        H=cfg["H"],
        V=cfg["V"],
        seed=cfg["seed"],
        max_len=cfg["max_len"],
        ignore_frac=cfg["ignore_frac"],
        with_bias=cfg["with_bias"],
    )
    predicted_rows = batch.N - cfg["B"] * cfg["K"]  # each sequence also has a last row predicting nothing
    assert predicted_rows <= 60
    opts = dict(cfg["opts"], softcap=cfg["softcap"], temperature=cfg["temperature"])
    opts["responses_per_prompt"] = cfg["K"]
    ref_logps = None if opts["loss_type"] == "simpo" else batch.ref_logps
    results = {}
    for backend in ("reference", "torch"):
        h, w, b = batch.params()
        kw = {"chunk_tokens": cfg["chunk_tokens"]} if backend == "torch" else {}
        out = fused_linear_wrpo_loss(
            h, w, batch.labels, batch.cu_seqlens, bias=b, ref_logps=ref_logps, backend=backend, **opts, **kw
        )
        out.loss.backward()
        results[backend] = (out, h.grad, w.grad, None if b is None else b.grad)
    (o_ref, *g_ref), (o_ours, *g_ours) = results["reference"], results["torch"]
    assert_rel_close(o_ours.loss, o_ref.loss, TOL64, "loss")
    assert_rel_close(o_ours.logps, o_ref.logps, TOL64, "logps")
    for name, a, e in zip(("dX", "dW", "db"), g_ours, g_ref, strict=True):
        if e is None:
            assert a is None, name
        else:
            assert_rel_close(a, e, TOL64, name)
    assert set(o_ours.metrics) == set(o_ref.metrics)
    for k, v in o_ref.metrics.items():
        assert_rel_close(o_ours.metrics[k], v, TOL64, k)
