"""Run ``fused_linear_wrpo_loss`` on a batch and backprop; compare two runs output by output."""

from __future__ import annotations

from wrpo_kernels import fused_linear_wrpo_loss

from .errors import assert_rel_close

# the metrics of fused_linear_wrpo_loss (source_* only where a group has 2 or more chosen responses)
METRIC_NAMES = {
    "rewards/chosen",
    "rewards/source_chosen",
    "rewards/target_chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/source_accuracies",
    "rewards/pivot_accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/source_chosen",
    "logps/target_chosen",
    "logps/rejected",
    "cur_alpha",
    "logits/chosen",
    "logits/rejected",
}


def fused(batch, backend, *, dtype=None, chunk_tokens=None, ref="BK", grad=True, upstream=1.0, **opts):
    """Run the fused loss and backprop ``upstream * loss``; returns a dict of everything to compare."""
    h, w, b = batch.params(dtype, requires_grad=grad)
    ref_logps = None if ref is None else (batch.ref_logps if ref == "BK" else batch.ref_logps.reshape(-1))
    kw = {} if backend == "reference" else {"chunk_tokens": chunk_tokens}
    out = fused_linear_wrpo_loss(
        h,
        w,
        batch.labels,
        batch.cu_seqlens,
        bias=b,
        ref_logps=ref_logps,
        responses_per_prompt=batch.K,
        backend=backend,
        **opts,
        **kw,
    )
    if grad:
        (out.loss * upstream).backward()
    return {
        "loss": out.loss.detach(),
        "logps": out.logps,
        "metrics": out.metrics,
        "dX": h.grad,
        "dW": w.grad,
        "db": None if b is None else b.grad,
        "out": out,
    }


def check_all_close(ours, ref, tol, label=""):
    for name in ("loss", "logps", "dX", "dW", "db"):
        if ref[name] is None:
            assert ours[name] is None, f"{label} {name}: expected no gradient"
            continue
        assert_rel_close(ours[name], ref[name], tol, f"{label} {name}")
    assert set(ours["metrics"]) == set(ref["metrics"]), label
    for k, v in ref["metrics"].items():
        assert_rel_close(ours["metrics"][k], v, tol, f"{label} metric {k}")
