"""wrpo_loss with bf16 log-probs: the arithmetic and the token counts stay in fp32.

bf16 holds integers exactly only up to 256 (257 -> 256, 1023 -> 1024), so casting the lengths of
simpo/ipo to the log-probs' dtype changed the loss. The truth here is the fp64 reference on the same
bf16 log-probs, upcast; the loss and the gradients come back in bf16, so the tolerance is a few bf16
roundings.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_rel_close

from wrpo_kernels import wrpo_loss
from wrpo_kernels.api import triton_unavailable_reason

BF16_TOL = 8e-3  # two bf16 ulps (2^-8 relative) for a result rounded to bf16
BACKENDS = ["torch", "reference"]
if importlib.util.find_spec("triton") is not None and triton_unavailable_reason(torch.device("cpu")) is None:
    BACKENDS.append("triton")


def run(policy, ref, lengths, backend, **opts):
    p = policy.detach().clone().requires_grad_()
    loss, metrics = wrpo_loss(p, ref, lengths, backend=backend, **opts)
    loss.backward()
    return loss.detach(), p.grad, metrics


def truth(policy, ref, lengths, **opts):
    """The fp64 reference on the same (bf16-rounded) log-probs."""
    return run(policy.double(), None if ref is None else ref.double(), lengths, "reference", **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n_chosen", "n_rejected"), [(256, 257), (1024, 1023)])
@pytest.mark.parametrize(
    ("loss_type", "beta"),
    [("simpo", 10.0), ("ipo", 100.0)],
)
def test_counts_above_256_are_not_rounded(loss_type, beta, n_chosen, n_rejected, backend):
    """Equal log-probs -2 * n_chosen for both responses: the margin comes only from n_rejected != n_chosen
    (rounded to bf16, 257 -> 256 and 1023 -> 1024, it vanished and the loss was off by 6% or more)."""
    s = torch.full((1, 2), -2.0 * n_chosen, dtype=torch.bfloat16)  # exact in bf16
    lengths = torch.tensor([[n_chosen, n_rejected]])
    ref = None if loss_type == "simpo" else torch.zeros(1, 2, dtype=torch.bfloat16)
    opts = {"loss_type": loss_type, "beta": beta, "num_chosen": 1}
    loss, grad, metrics = run(s, ref, lengths, backend, **opts)
    exact_loss, exact_grad, exact_metrics = truth(s, ref, lengths, **opts)
    assert loss.dtype == grad.dtype == torch.bfloat16
    assert_rel_close(loss, exact_loss, BF16_TOL, "loss")
    assert_rel_close(grad, exact_grad, BF16_TOL, "d policy")
    # the implicit reward of the rejected response: c * s with c = beta / n (simpo) or 1 / n (ipo), in fp32
    assert metrics["rewards/rejected"].dtype == torch.float32
    assert_rel_close(metrics["rewards/rejected"], exact_metrics["rewards/rejected"], 1e-6, "reward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
def test_bf16_logps_with_long_responses_match_fp64(loss_type, backend):
    g = torch.Generator().manual_seed(7)
    B, K = 4, 3
    lengths = torch.randint(200, 1100, (B, K), generator=g)
    lengths[0] = torch.tensor([257, 1023, 513])
    ref = (-2.3 * lengths + 5 * torch.randn(B, K, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    policy = (ref.double() + 8 * torch.randn(B, K, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    opts = {"loss_type": loss_type, "beta": 0.5 if loss_type == "dpo" else 2.0, "num_chosen": 2}
    ref_arg = None if loss_type == "simpo" else ref
    loss, grad, metrics = run(policy, ref_arg, lengths, backend, **opts)
    exact_loss, exact_grad, exact_metrics = truth(policy, ref_arg, lengths, **opts)
    assert loss.dtype == grad.dtype == torch.bfloat16
    assert_rel_close(loss, exact_loss, BF16_TOL, "loss")
    assert_rel_close(grad, exact_grad, BF16_TOL, "d policy")
    for k in ("rewards/chosen", "rewards/rejected"):  # fp32 (margins: a difference, cancels digits)
        assert_rel_close(metrics[k], exact_metrics[k], 1e-5, k)


def test_fp32_reference_logps_are_not_rounded_to_bf16():
    """ref_logps given in fp32 next to bf16 policy log-probs are used as given (not rounded to bf16)."""
    policy = torch.tensor([[-300.0, -302.0, -310.0]], dtype=torch.bfloat16)
    ref = torch.tensor([[-300.7, -301.2, -309.4]], dtype=torch.float32)  # not bf16 values
    opts = {"loss_type": "dpo", "beta": 1.0, "num_chosen": 2}
    loss, grad, _ = run(policy, ref, None, "torch", **opts)
    exact_loss, exact_grad, _ = run(policy.double(), ref.double(), None, "reference", **opts)
    assert_rel_close(loss, exact_loss, BF16_TOL, "loss")
    assert_rel_close(grad, exact_grad, BF16_TOL, "d policy")
