"""``logp_reduction="mean"``: the fused loss on per-token mean log-probs, on every backend, against an
fp64 oracle written out here (full logits -> log_softmax -> gather -> per-sequence mean over labelled
tokens -> the group loss of docs/method.md §3), values and gradients w.r.t. hidden, weight and bias."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import IGNORE, assert_rel_close, fused, make_batch

import wrpo_kernels as wk
from wrpo_kernels import native
from wrpo_kernels.api import triton_unavailable_reason

B, K, C, H, V = 2, 3, 2, 19, 53
LENGTHS = [9, 1, 7, 4, 11, 5]  # predicted tokens, unequal, one 1-token response (a chosen one)
TOL64, TOL32 = 1e-10, 2e-4
NO_TRITON = triton_unavailable_reason(torch.device("cpu"))

BACKENDS = [
    "torch",  # the native CPU row kernels where they build, else pure torch
    "torch-pure",
    pytest.param("triton", marks=pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))),
    "reference",
]
CASES = {
    "dpo": {"loss_type": "dpo", "beta": 0.7, "alpha": 0.3},
    "dpo-smooth-gamma-nll-softcap": {
        "loss_type": "dpo",
        "beta": 0.9,
        "alpha": 0.2,
        "label_smoothing": 0.1,
        "gamma": 0.3,
        "nll_weight": 0.4,
        "softcap": 2.5,
        "temperature": 0.8,
    },
    "simpo-gamma-nll": {"loss_type": "simpo", "beta": 2.0, "alpha": 0.4, "gamma": 0.5, "nll_weight": 0.3},
    "ipo-nll": {"loss_type": "ipo", "beta": 0.6, "alpha": 0.1, "nll_weight": 0.2},
    "dpo-accumulation": {
        "loss_type": "dpo",
        "beta": 0.5,
        "alpha": 0.3,
        "nll_weight": 0.5,
        "num_groups": 5,
        "num_nll_tokens": 41,
    },
}


@pytest.fixture(scope="module")
def batch():
    return make_batch(B=B, K=K, H=H, V=V, seed=11, lengths=LENGTHS, ignore_frac=0.3, with_bias=True)


def mean_ref_logps(batch):
    """Reference log-probs already averaged per token, as the "mean" reduction takes them."""
    return batch.ref_logps / batch.counts.view(B, K).double()


def group_losses(mean, ref, opts):
    """Group losses [B] and rewards [B, K] of docs/method.md §3 on per-token mean log-probs (K = 3, C = 2)."""
    beta, alpha = opts["beta"], opts["alpha"]
    r = {"dpo": beta * (mean - ref), "simpo": beta * mean, "ipo": mean - ref}[opts["loss_type"]]
    m = r[:, 0] * alpha + r[:, 1] * (1 - alpha) - r[:, 2] - opts.get("gamma", 0.0)
    if opts["loss_type"] == "ipo":
        return (m - 1 / (2 * beta)) ** 2, r
    eps = opts.get("label_smoothing", 0.0)
    return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m), r


def oracle(batch, opts):
    """(loss, mean log-probs [B, K], rewards [B, K], nll, dX, dW, db) in fp64 with plain autograd."""
    h, w, b = batch.params(torch.float64)
    z = h @ w.T + b
    if opts.get("softcap"):
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    z = z / opts.get("temperature", 1.0)
    valid = batch.labels != IGNORE
    picked = torch.log_softmax(z, -1).gather(1, batch.labels.clamp_min(0)[:, None]).squeeze(1)
    tok = torch.where(valid, picked, 0.0)
    cu = batch.cu_seqlens.tolist()
    sums = torch.stack([tok[cu[s] : cu[s + 1]].sum() for s in range(B * K)]).view(B, K)
    n = torch.tensor([int(valid[cu[s] : cu[s + 1]].sum()) for s in range(B * K)], dtype=torch.float64)
    mean = sums / n.view(B, K)
    losses, r = group_losses(mean, mean_ref_logps(batch), opts)
    first_tokens = n.view(B, K)[:, 0].sum()
    nll = -sums[:, 0].sum() / first_tokens
    loss = losses.sum() / opts.get("num_groups", B)
    loss = loss - opts.get("nll_weight", 0.0) * sums[:, 0].sum() / opts.get("num_nll_tokens", first_tokens)
    loss.backward()
    return {
        "loss": loss.detach(),
        "logps": mean.detach(),
        "rewards": r.detach(),
        "nll": nll.detach(),
        "dX": h.grad,
        "dW": w.grad,
        "db": b.grad,
    }


def run(batch, backend, chunk_tokens=None, **opts):
    name = "torch" if backend == "torch-pure" else backend
    kw = {"dtype": torch.float32} if backend == "triton" else {}
    if backend != "reference":
        kw["chunk_tokens"] = chunk_tokens
    averaged = replace(batch, ref_logps=mean_ref_logps(batch))
    with native.disabled() if backend == "torch-pure" else contextlib.nullcontext():
        return fused(averaged, name, logp_reduction="mean", **kw, **opts)


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-pass", "split-groups"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_matches_fp64_oracle(backend, case, chunk, batch):
    if backend == "reference" and chunk is not None:
        pytest.skip("the reference backend has no chunks")
    opts = CASES[case]
    want = oracle(batch, opts)
    got = run(batch, backend, chunk_tokens=chunk, **opts)
    tol = TOL32 if backend == "triton" else TOL64
    errors = {}
    for name in ("loss", "logps", "dX", "dW", "db"):
        assert_rel_close(got[name], want[name], tol, f"{backend} {case} {name}")
        errors[name] = (got[name].double() - want[name]).abs().max().item()
    print(
        f"{backend} {case} chunk={chunk} max abs err: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    metrics, r, w = (
        got["metrics"],
        want["rewards"],
        torch.tensor([opts["alpha"], 1 - opts["alpha"]], dtype=torch.float64),
    )
    assert_rel_close(metrics["logps/chosen"], want["logps"][:, :C].mean(), tol, "logps/chosen")
    assert_rel_close(metrics["logps/rejected"], want["logps"][:, C:].mean(), tol, "logps/rejected")
    assert_rel_close(metrics["rewards/chosen"], (r[:, :C] @ w).mean(), tol, "rewards/chosen")
    assert_rel_close(metrics["rewards/rejected"], r[:, C:].mean(), tol, "rewards/rejected")
    if opts.get("nll_weight"):
        assert_rel_close(metrics["nll_loss"], want["nll"], tol, "nll_loss")


def test_the_batch_has_the_intended_shape(batch):
    """N = 37 + 6 rows (each sequence's last predicts nothing), a 1-token response, and ignored rows:
    counts differ from lengths."""
    assert batch.N == 43 and min(batch.seqlens) == 2
    assert (batch.counts < torch.tensor(LENGTHS)).any() and (batch.counts >= 1).all()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_mean_logps_are_the_sums_over_the_label_counts(backend, batch):
    """``out.logps`` under "mean" = "sum"'s over n = linear_logprobs(reduction="mean"); dpo's loss moves."""
    opts = {"loss_type": "dpo", "beta": 0.5, "ref_logps": batch.ref_logps, "backend": backend}
    args = (batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    summed = wk.fused_linear_wrpo_loss(*args, bias=batch.bias, **opts)
    mean = wk.fused_linear_wrpo_loss(*args, bias=batch.bias, logp_reduction="mean", **opts)
    n = batch.counts.view(B, K).double()
    assert_rel_close(mean.logps, summed.logps / n, TOL64, "mean vs sum / n")
    lp = wk.linear_logprobs(*args, bias=batch.bias, reduction="mean", backend=backend).view(B, K)
    assert_rel_close(mean.logps, lp, TOL64, "mean vs linear_logprobs")
    assert abs(mean.loss.item() - summed.loss.item()) > 1e-3


@pytest.mark.parametrize("loss_type", ["simpo", "ipo"])
def test_length_normalised_losses_are_unchanged_by_mean(loss_type, batch):
    """simpo and ipo are per token already: "mean" (with averaged ref_logps) gives "sum"'s loss, rewards
    and gradients, only the reported log-probs are averaged."""
    opts = {"loss_type": loss_type, "beta": 0.8, "nll_weight": 0.3}
    summed = fused(batch, "torch", **opts)
    mean = run(batch, "torch", **opts)
    for name in ("loss", "dX", "dW", "db"):
        assert_rel_close(mean[name], summed[name], 1e-12, name)
    for name in ("rewards/chosen", "rewards/margins", "nll_loss"):
        assert_rel_close(mean["metrics"][name], summed["metrics"][name], 1e-12, name)
    assert_rel_close(mean["logps"], summed["logps"] / batch.counts.view(B, K).double(), 1e-12, "logps")


def test_gradient_accumulation_adds_up_under_mean(batch):
    """Micro-batches of one group each, with the batch's num_groups / num_nll_tokens, sum to the batch."""
    opts = {"loss_type": "dpo", "beta": 0.5, "nll_weight": 0.4, "logp_reduction": "mean", "backend": "torch"}
    ref = mean_ref_logps(batch)
    cu, counts = batch.cu_seqlens.tolist(), batch.counts.view(B, K)
    whole = wk.fused_linear_wrpo_loss(
        batch.hidden, batch.weight, batch.labels, batch.cu_seqlens, bias=batch.bias, ref_logps=ref, **opts
    )
    total = 0.0
    for g in range(B):
        a, b = cu[g * K], cu[(g + 1) * K]
        cu_g = batch.cu_seqlens[g * K : (g + 1) * K + 1] - a
        part = wk.fused_linear_wrpo_loss(
            batch.hidden[a:b],
            batch.weight,
            batch.labels[a:b],
            cu_g,
            bias=batch.bias,
            ref_logps=ref[g : g + 1],
            num_groups=B,
            num_nll_tokens=counts[:, 0].sum(),
            **opts,
        )
        total = total + part.loss
    assert_rel_close(total, whole.loss, 1e-12, "sum of micro-batch losses")


@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "ipo"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch-pure"])
def test_wrpo_loss_takes_mean_logps(backend, loss_type):
    """``wrpo_loss(..., logp_reduction="mean")`` on [B, K] means, no lengths: the oracle's loss and dL/ds."""
    g = torch.Generator().manual_seed(5)
    mean = -2.0 - torch.rand(5, K, generator=g, dtype=torch.float64)
    ref = mean + 0.3 * torch.randn(5, K, generator=g, dtype=torch.float64)
    opts = {"loss_type": loss_type, "beta": 0.8, "alpha": 0.3, "gamma": 0.1}
    want_s = mean.clone().requires_grad_()
    group_losses(want_s, ref, opts)[0].mean().backward()
    dtype = torch.float32 if backend == "triton" else torch.float64
    s = mean.to(dtype).requires_grad_()
    loss, metrics = wk.wrpo_loss(s, ref.to(dtype), None, logp_reduction="mean", backend=backend, **opts)
    loss.backward()
    tol = TOL32 if backend == "triton" else TOL64
    assert_rel_close(loss, group_losses(mean, ref, opts)[0].mean(), tol, "loss")
    assert_rel_close(s.grad, want_s.grad, tol, "dL/ds")
    assert_rel_close(metrics["logps/rejected"], mean[:, C:].mean(), tol, "logps/rejected")


def test_module_takes_the_option(batch):
    mod = wk.FusedLinearWRPOLoss(beta=0.5, logp_reduction="mean")
    assert mod.logp_reduction == "mean" and "logp_reduction='mean'" in repr(mod)
    args = (batch.hidden, batch.weight, batch.labels, batch.cu_seqlens)
    ref = mean_ref_logps(batch)
    got = mod(*args, ref_logps=ref, bias=batch.bias)
    want = wk.fused_linear_wrpo_loss(*args, ref_logps=ref, bias=batch.bias, beta=0.5, logp_reduction="mean")
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logps, want.logps)
    mod.logp_reduction = "sum"
    assert not torch.equal(mod(*args, ref_logps=ref, bias=batch.bias).logps, got.logps)


def test_unknown_logp_reduction_is_refused(batch):
    with pytest.raises(ValueError, match=r"logp_reduction='avg' is not one of \('sum', 'mean'\)"):
        wk.fused_linear_wrpo_loss(
            batch.hidden,
            batch.weight,
            batch.labels,
            batch.cu_seqlens,
            ref_logps=batch.ref_logps,
            logp_reduction="avg",
        )


def test_preference_loss_forwards_the_option():
    """``wrpo.preference_loss(model, batch, logp_reduction="mean")`` = the model's own logits averaged."""
    pytest.importorskip("transformers")
    from helpers.tiny_models import sizes, tiny_model

    import wrpo

    model = tiny_model(
        "llama",
        vocab_size=40,
        **sizes(16, 32, 1, 2, 1),
        head_dim=8,
        attn_implementation="sdpa",
    )
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 40, (n,), generator=g).tolist()

    feats = [
        {"prompt_ids": ids(3), "responses": [ids(k + 1) for k in (4, 0, 2)], "num_chosen": 2}
        for _ in range(2)
    ]
    padded = wrpo.pad_groups(feats, pad_token_id=0)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    valid = padded["labels"] != IGNORE
    picked = logits.log_softmax(-1).gather(-1, padded["labels"].clamp_min(0)[..., None]).squeeze(-1)
    mean = ((picked * valid).sum(1) / valid.sum(1)).view(2, 3).detach()
    ref = mean - 0.3 * torch.arange(6, dtype=torch.float64).view(2, 3)
    want, _ = wk.wrpo_loss(mean, ref, None, beta=0.5, backend="reference")
    out = wrpo.preference_loss(model, padded, ref_logps=ref, beta=0.5, logp_reduction="mean", backend="torch")
    assert_rel_close(out.logps, mean, 1e-10, "logps")
    assert_rel_close(out.loss, want, 1e-10, "loss")
