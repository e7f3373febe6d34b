"""wrpo_loss on [B, K] log-probs on every backend against the fp64 reference backend: the loss, the
gradients of the policy and reference log-probs, and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_rel_close, preference_inputs
from helpers.backends import REFERENCE, TORCH, TRITON, cases

from wrpo_kernels import wrpo_loss

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}  # fp32: Triton's kernel vs the fp64 reference


def far_inputs(B, K, seed):
    """policy and ref around -40 (as Triton's test has them), lengths in [1, 30)."""
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(B, K, generator=g, dtype=torch.float64) * 3 - 40
    ref = torch.randn(B, K, generator=g, dtype=torch.float64) * 3 - 40
    return policy, ref, torch.randint(1, 30, (B, K), generator=g)


@dataclass
class Case:
    id: str
    inputs: tuple  # (policy, ref | None, lengths)
    opts: dict
    full: bool = True  # check d ref and the metric values too (else the loss, d policy, metric names)


def with_ref(loss_type, inputs):
    policy, ref, lengths = inputs
    return policy, ref if loss_type != "simpo" else None, lengths


SHAPES = [
    Case(
        f"{loss_type}-K{K}-C{C}",
        with_ref(loss_type, preference_inputs(5, K, seed=K * 10 + C)),
        {"loss_type": loss_type, "num_chosen": C, "alpha": 0.3, "beta": 0.2},
    )
    for K, C in ((2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (4, 3))
    for loss_type in ("dpo", "simpo", "ipo")
]
OPTIONS = [
    Case(
        "-".join(f"{k}={v}" for k, v in opts.items()),
        with_ref(opts["loss_type"], preference_inputs(4, 3, seed=1)),
        {"beta": 0.1, **opts},
    )
    for opts in (
        {"loss_type": "dpo", "label_smoothing": 0.25},
        {"loss_type": "simpo", "label_smoothing": 0.1, "gamma": 0.5},
        {"loss_type": "ipo", "beta": 0.05},
        {"loss_type": "dpo", "chosen_weights": [0.6, 0.4]},
        {"loss_type": "dpo", "gamma": 1.0},
    )
]
TRITON_SHAPES = [
    Case(
        f"{loss_type}-K{K}-C{C}",
        far_inputs(5, K, seed=K),
        {"num_chosen": C, "loss_type": loss_type, "beta": 0.3, "alpha": 0.2},
        full=False,
    )
    for loss_type in ("dpo", "simpo", "ipo")
    for K, C in ((2, 1), (3, 2), (4, 2))
]


def run(backend, dtype, policy, ref, lengths, ref_grad=True, **opts):
    device = backend.device
    p = policy.detach().to(device, dtype).clone().requires_grad_(True)
    r = None if ref is None else ref.detach().to(device, dtype).clone().requires_grad_(ref_grad)
    loss, metrics = wrpo_loss(p, r, lengths.to(device), backend=backend.name, **opts)
    loss.backward()
    return loss.detach(), p.grad, None if r is None or not ref_grad else r.grad, metrics


def check_against_reference(backend, case):
    reference = run(
        REFERENCE.moved_to(backend.device), torch.float64, *case.inputs, ref_grad=case.full, **case.opts
    )
    ours = run(backend, backend.dtype, *case.inputs, ref_grad=case.full, **case.opts)
    tol, label = TOL[backend.dtype], f"{backend.id} {case.id}"
    assert_rel_close(ours[0], reference[0], tol, f"{label} loss")
    assert_rel_close(ours[1], reference[1], tol, f"{label} d policy")
    assert set(ours[3]) == set(reference[3]), label
    if not case.full:
        return ours
    if reference[2] is not None:
        assert ours[2] is not None, f"{label}: no gradient for ref_logps"
        assert_rel_close(ours[2], reference[2], tol, f"{label} d ref")
    for k, v in reference[3].items():
        assert not ours[3][k].requires_grad and ours[3][k].dim() == 0, k
        assert_rel_close(ours[3][k], v, tol, f"{label} {k}")
    return ours


@pytest.mark.parametrize(("backend", "case"), cases({TORCH: SHAPES, TRITON: TRITON_SHAPES}))
def test_loss_and_gradients_match_fp64_reference(backend, case):
    ours = check_against_reference(backend, case)
    assert ours[1].abs().sum() > 0


@pytest.mark.parametrize(("backend", "case"), cases({TORCH: OPTIONS}))
def test_every_option_matches_fp64_reference(backend, case):
    check_against_reference(backend, case)
