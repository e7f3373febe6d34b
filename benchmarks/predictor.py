"""The sweep's runtime and memory predictor, and the plan it decides: which methods run on a
configuration, which are over the memory cap, and what the time budget leaves out.

Predictions scale a method's own nearest measurement in this sweep (time with the work N V H; memory
with N V for the logits-sized methods, with (N + V) H for the others) or, before it has one, a prior
relative to ours. ``cli`` is the sweep's options: device, dtype, reps, no_check, mem_cap_gb, time_budget.
"""

from __future__ import annotations

from methods import DTYPES, GEMM, OURS
from sweep_grid import OPTIONAL, work

LOGITS_SIZED = {"naive-eager", "naive-compile", "trl-chunked"}  # peak memory grows with N V
# Priors before a method has been measured in this sweep: step time relative to ours, and peak memory
# in bytes per logit (N V) for the logits-sized methods
TIME_PRIOR = {
    "naive-eager": 3.5,
    "naive-compile": 3.0,
    "trl-chunked": 3.0,
    "liger-dpo/k2": 2.5,
    "cce-logps": 1.5,
    GEMM: 1.0,
}
MEM_PRIOR = {"naive-eager": 12.0, "naive-compile": 8.0, "trl-chunked": 36.0}
CHILD_S = 4.0  # a memory child's start (import torch, build inputs): seconds, CPU
BUILD_S = 2.0  # building a method on CUDA (Triton compiles, autotuning): seconds
SLACK = 1.15  # predicted steps are stretched by this: a loaded host runs slower than what they scale from
COMPILE_S = 30.0  # torch.compile of the naive loss, per process (the timing one and the memory child)


def measured_rows(record: dict, method: str) -> list[dict]:
    return [r for r in record["rows"] if r["method"] == method and r["status"] == "ok"]


def nearest(rows: list[dict], c: dict) -> dict | None:
    """The measured row closest to configuration ``c`` (same V and H first, then the largest work)."""
    same = [r for r in rows if r["V"] == c["V"] and r["H"] == c["H"]] or rows
    return max(same, key=work) if same else None


def predict_mem_mb(record: dict, method: str, c: dict, cli) -> float | None:
    """Peak memory of ``method`` on ``c`` (MiB): from its own nearest measurement, else a prior."""
    logits = c["tokens"] * c["V"]
    other = (c["tokens"] + c["V"]) * c["H"]  # elements of dX and dW
    near = nearest([r for r in measured_rows(record, method) if r.get("peak_mem_mb")], c)
    if near:
        if method in LOGITS_SIZED:
            return near["peak_mem_mb"] * logits / (near["tokens"] * near["V"])
        return near["peak_mem_mb"] * max(1.0, other / ((near["tokens"] + near["V"]) * near["H"]))
    if method in LOGITS_SIZED:
        return MEM_PRIOR[method] * logits / 2**20
    if method == GEMM:
        return None  # not measured
    return (4 * other * DTYPES[cli.dtype].itemsize + 64 * 2**20) / 2**20


def predict_step_s(record: dict, method: str, c: dict) -> float | None:
    """Seconds of one fwd+bwd of ``method`` on ``c``, scaled by the work N V H from its nearest
    measurement (else from ours, through a prior ratio); None with nothing measured yet."""
    near = nearest(measured_rows(record, method), c)
    if near:
        return near["median_ms"] / 1e3 * work(c) / work(near)
    for ours in OURS:
        near = nearest(measured_rows(record, ours), c)
        if near:
            return TIME_PRIOR.get(method, 1.0) * near["median_ms"] / 1e3 * work(c) / work(near)
    return None


def predict_cost_s(record: dict, methods: list[str], c: dict, cli) -> float | None:
    """Wall seconds of configuration ``c`` with ``methods``: steps (warm-up, reps, check, memory),
    a memory child each (CPU), torch.compile in each of naive-compile's processes."""
    total = 0.0
    for m in methods:
        step = predict_step_s(record, m, c)
        if step is None:
            return None
        total += (cli.reps + 1 + (m != GEMM)) * step * SLACK  # timed, warm-up, memory child
        if m != GEMM:
            total += CHILD_S if cli.device == "cpu" else BUILD_S
        if m == "naive-compile":
            total += COMPILE_S * (2 if cli.device == "cpu" else 1)
    if not cli.no_check:  # the reference of the check: about one step of ours
        total += max((predict_step_s(record, m, c) or 0.0 for m in OURS), default=0.0)
    return total


def plan(record: dict, c: dict, methods: list[str], cli) -> tuple[list[str], dict]:
    """-> (methods to run, {method: (status, reason)} of those not run) for configuration ``c``."""
    run_now, out = [], {}
    cap_mb = cli.mem_cap_gb * 1024 if cli.mem_cap_gb else None
    for m in methods:
        if m == "liger-dpo/k2" and c["K"] != 2:
            out[m] = ("skipped", "Liger's fused DPO takes pairs only (K = 2)")
            continue
        if m in c.get("not_in_grid", {}):
            out[m] = ("skipped", c["not_in_grid"][m])
            continue
        pred = predict_mem_mb(record, m, c, cli) if cap_mb else None
        if pred is not None and pred > cap_mb:
            out[m] = ("over cap", f"predicted {pred / 1024:.1f} GiB > cap {cli.mem_cap_gb:g} GiB")
            continue
        run_now.append(m)
    return run_now, out


def budget_cut(record: dict, c: dict, run_now: list[str], later: list, cli, elapsed: float):
    """Apply the time budget to ``c``, keeping time for the cheapest run of the configurations
    ``later`` ((config, methods) pairs): naive-compile goes first, then ``c`` itself.

    -> (methods kept, {method: reason dropped}, reason to skip ``c`` or None)."""
    if not cli.time_budget:
        return run_now, {}, None
    left = cli.time_budget - elapsed
    later = [(c2, m2) for c2, m2 in later if OPTIONAL not in c2.get("not_in_grid", {})]
    later_min = 0.0
    for c2, methods2 in later:
        later_min += predict_cost_s(record, [m for m in methods2 if m != "naive-compile"], c2, cli) or 0.0
    full = predict_cost_s(record, run_now, c, cli)
    if full is None or full + later_min <= left:
        return run_now, {}, None
    lean = [m for m in run_now if m != "naive-compile"]
    lean_cost = predict_cost_s(record, lean, c, cli) or 0.0
    dropped = {}
    if len(lean) < len(run_now):
        dropped["naive-compile"] = (
            f"time budget: predicted {full - lean_cost:.0f} s here (compile and steps); {left:.0f} s of "
            f"{cli.time_budget:.0f} s left, {later_min:.0f} s kept for the {len(later)} configurations after"
        )
    if lean_cost <= left:
        return lean, dropped, None
    return (
        [],
        {},
        f"time budget: predicted {lean_cost:.0f} s, {max(left, 0):.0f} s of {cli.time_budget:.0f} s left",
    )
