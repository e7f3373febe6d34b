"""WRPO at alpha = 0 / 1 is DPO on (y_wt, y_l) / (y_ws, y_l): parity with Liger's fused DPO loss (fp32)."""

from __future__ import annotations

import pytest
import torch

from wrpo_kernels import fused_linear_wrpo_loss, linear_logprobs

liger_dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")

IGNORE = -100
BETA = 0.1
SOURCE, TARGET, REJECTED = 0, 1, 2  # response order inside a group


def make_groups(B=3, T=6, H=16, V=40, seed=0):
    """Responses [B, 3, T, H] of equal padded length T (trailing tokens ignored), policy and reference."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, 3, T, H, generator=g)
    ref_hidden = hidden + 0.3 * torch.randn(B, 3, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, 3, T), generator=g)
    lengths = torch.randint(2, T, (B, 3), generator=g)  # the last of T rows predicts nothing
    labels[torch.arange(T) >= lengths[..., None]] = IGNORE
    return hidden, ref_hidden, weight, ref_weight, labels


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(("alpha", "used", "unused"), [(0.0, TARGET, SOURCE), (1.0, SOURCE, TARGET)])
def test_wrpo_endpoints_equal_liger_dpo(alpha, used, unused, backend):
    B, T, H = 3, 6, 16
    hidden, ref_hidden, weight, ref_weight, labels = make_groups(B, T, H)

    # ours: packed [B*3*T, H], group-major, every response padded to T rows (padding ignored)
    S = B * 3
    cu = torch.arange(0, (S + 1) * T, T)
    ref_logps = linear_logprobs(
        ref_hidden.reshape(-1, H), ref_weight, labels.reshape(-1), cu, backend="reference"
    ).view(B, 3)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_wrpo_loss(
        h.reshape(-1, H),
        w,
        labels.reshape(-1),
        cu,
        responses_per_prompt=3,
        num_chosen=2,
        alpha=alpha,
        ref_logps=ref_logps,
        loss_type="dpo",
        beta=BETA,
        backend=backend,
        chunk_tokens=2 * 3 * T,
    )
    out.loss.backward()

    # Liger: [2B, T, H], chosen rows first, then rejected; targets unshifted
    pick = [used, REJECTED]
    x = torch.cat([hidden[:, k] for k in pick]).clone().requires_grad_(True)
    ref_x = torch.cat([ref_hidden[:, k] for k in pick])
    target = torch.cat([labels[:, k] for k in pick])
    lw = weight.clone().requires_grad_(True)
    liger = liger_dpo.LigerFusedLinearDPOLoss(
        beta=BETA, compiled=False, use_ref_model=True, average_log_prob=False, ignore_index=IGNORE
    )
    res = liger(lw, x, target, ref_input=ref_x, ref_weight=ref_weight)
    liger_loss = res[0] if isinstance(res, tuple) else res
    liger_loss.backward()

    def rel(a, e):
        return ((a - e).abs().max() / e.abs().max()).item()

    assert rel(out.loss.detach(), liger_loss.detach()) <= 1e-5
    assert rel(h.grad[:, used], x.grad[:B]) <= 1e-5
    assert rel(h.grad[:, REJECTED], x.grad[B:]) <= 1e-5
    assert rel(w.grad, lw.grad) <= 1e-5
    assert torch.equal(h.grad[:, unused], torch.zeros_like(h.grad[:, unused]))
    # the loss is not at its trivial value, and the gradients are not trivially zero
    assert abs(out.loss.item() - 0.6931471805599453) > 1e-3
    assert x.grad.abs().max() > 0
