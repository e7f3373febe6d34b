"""How the fused head loss's cost grows: tokens, responses per prompt (K, two K = 4 layouts), vocabulary.

One script for the CPU and the GPU. Each configuration (a layout, V, a token count, H) runs
bench_head_loss's methods side by side, interleaved round-robin in one process (median of --reps
fwd+bwd steps after a warm-up, with bench_head_loss's loss/gradient check; CPU memory: peak RSS rise in
a fresh process per method; CUDA: max allocated above the inputs):

  naive-eager      full [N, V] logits, log_softmax, gather
  naive-compile    the same under torch.compile
  wrpo-torch (CPU) / wrpo-triton (CUDA)   ours
  trl-chunked, cce-logps (CUDA), liger-dpo/k2 (K = 2 only: Liger takes pairs)   the peers that run here
  gemm-only        the step's three GEMMs alone (logits = X W^T, dX = G W, dW = G^T X, same rows, dtype
                   and device; in row chunks when one [N, V] buffer would not fit in half the memory
                   cap, chunk times summed): the machine's own GEMM rate at this shape

Layouts: K2 (1 chosen, 1 rejected), K3 (2 chosen: source, target; 1 rejected), K4-2c2r (2 chosen,
2 rejected), K4-3c1r (3 chosen, 1 rejected); default chosen weights (the sources share alpha = 0.1, the
target gets 0.9; the rejected rewards are averaged). B prompts x K responses x T tokens = N tokens.

FLOPs counted: 6 N H V per fwd+bwd of the head (logits, dX, dW: 2 N H V each), over all N rows (prompt
positions included; they are 1 in T); bench_head_loss's ``tflops`` counts 8 N H V for the two-pass
peers. ``gemm_ratio`` = a method's step time / gemm-only's time on the same configuration (1.0 would
be the GEMMs alone: the distance to this machine's limit for a method that computes the logits once).

Memory cap (--mem-cap-gb): before a method runs, its peak is predicted from its own measurements at
smaller sizes (the logits-sized methods scale with N V, the others with (N + V) H) or, with none yet,
from a prior; a method predicted over the cap is recorded "over cap" with the prediction, not run.
A method that fails is recorded ("oom" for out of memory, else "failed"), and the others go on.
Time budget (--time-budget): configurations run in the order of the grid; before each, its cost is
predicted from the steps measured so far; naive-compile (a compile per process) is dropped first when
this configuration and the cheapest run of the ones after it would not fit, then the configuration
itself, each recorded with why. The JSON is rewritten after every configuration (a killed sweep keeps
what it measured); the plots at the end (--replot redraws them from the JSON).

    python benchmarks/sweep.py                                   # the CPU grid (`make sweep`)
    python benchmarks/sweep.py --device cuda                     # the GPU grid, V up to 256k
    python benchmarks/sweep.py --layouts K3 --vocabs 32000,262144 --tokens 4096,16384 --hidden 4096
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_head_loss import DTYPES, GEMM, device_tag, machine, parse_args, run, write_json

LAYOUTS = {  # name -> (K, chosen)
    "K2": (2, 1), "K3": (3, 2), "K4-2c2r": (4, 2), "K4-3c1r": (4, 3),
}  # fmt: skip
LAYOUT_TEXT = {
    "K2": "K=2: 1 chosen, 1 rejected", "K3": "K=3: 2 chosen (source, target), 1 rejected",
    "K4-2c2r": "K=4: 2 chosen (source, target), 2 rejected",
    "K4-3c1r": "K=4: 3 chosen (2 sources, target), 1 rejected",
}  # fmt: skip
# On the CPU, torch.compile runs on the main panel only: each process compiles (tens of seconds here)
OPTIONAL = "optional"  # a key of a panel's dict: no time is kept back for it
NO_COMPILE = {"naive-compile": "the CPU grid compiles on the K3, V=32768 panel only: a compile per process "
              "(the timing one and each memory child) would not fit the 15 minutes"}  # fmt: skip
# Grids: (layout, V, tokens[, {method: why not run}]) panels. Configurations run smallest work (N V H)
# first, so that a time budget cuts the largest; the CPU grid runs in the order listed instead: the
# configurations that span each axis first (tokens 768 to 12288, the four layouts, the two
# vocabularies), then the other token counts, then the K = 2 and K = 4 layouts at 768 tokens, OPTIONAL
# ones (the time budget keeps no time back for them when it weighs naive-compile). Token counts are
# multiples of 48, so that B = 4 prompts x K responses divide them for K = 2, 3 and 4. The CPU cap,
# 2.75 GiB, stops naive between 6144 and 12288 tokens at V = 32768.
GRIDS = {
    "cpu": {
        "H": 256, "dtype": "fp32", "B": 4, "reps": 3, "mem_cap_gb": 2.75, "time_budget": 760.0,
        "order": "listed",
        "panels": [
            ("K3", 32768, (768, 3072, 12288)),
            *[(lay, 32768, (3072,), NO_COMPILE) for lay in ("K4-2c2r", "K4-3c1r", "K2")],
            ("K3", 131072, (768, 3072), NO_COMPILE),
            ("K3", 32768, (1536, 6144)),
            *[(lay, 32768, (768,), {**NO_COMPILE, OPTIONAL: ""}) for lay in ("K2", "K4-2c2r", "K4-3c1r")],
        ],
    },
    "gpu": {
        "H": 4096, "dtype": "bf16", "B": 4, "reps": 5, "mem_cap_gb": None, "time_budget": None,
        "panels": [
            *[("K3", V, (3072, 6144, 12288, 24576, 49152)) for V in (32000, 128256, 262144)],
            *[(lay, V, (3072, 12288, 49152)) for lay in LAYOUTS if lay != "K3" for V in (32000, 128256)],
        ],
    },
    "tiny": {
        "H": 16, "dtype": "fp32", "B": 1, "reps": 1, "mem_cap_gb": 1.0, "time_budget": None,
        "panels": [*[(lay, 96, (24, 48)) for lay in LAYOUTS], ("K3", 160, (24, 48))],
    },
}  # fmt: skip
METHODS = {
    "cpu": "naive-eager,naive-compile,wrpo-torch,trl-chunked,liger-dpo/k2,gemm-only",
    "cuda": "naive-eager,naive-compile,wrpo-triton,cce-logps,trl-chunked,liger-dpo/k2,gemm-only",
}
OURS = ("wrpo-torch", "wrpo-triton")
LOGITS_SIZED = {"naive-eager", "naive-compile", "trl-chunked"}  # peak memory grows with N V
# Priors before a method has been measured in this sweep: step time relative to ours, and peak memory
# in bytes per logit (N V) for the logits-sized methods or per (N + V) H element for the others
TIME_PRIOR = {"naive-eager": 3.5, "naive-compile": 3.0, "trl-chunked": 3.0, "liger-dpo/k2": 2.5,
              "cce-logps": 1.5, GEMM: 1.0}  # fmt: skip
MEM_PRIOR = {"naive-eager": 12.0, "naive-compile": 8.0, "trl-chunked": 36.0}
CHILD_S = 4.0  # a memory child's start (import torch, build inputs): seconds, CPU
BUILD_S = 2.0  # building a method on CUDA (Triton compiles, autotuning): seconds
SLACK = 1.15  # step-time predictions ran ~15% short on a loaded host
COMPILE_S = 30.0  # torch.compile of the naive loss, per process (the timing one and the memory child)


def ints(text):
    return tuple(int(x) for x in str(text).split(",") if x)


def layout_of(name):
    if name not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return name


def make_configs(cli):
    """The grid's configurations, in order: dicts with the layout, K, C, V, H, B, T and N."""
    grid = GRIDS[cli.grid]
    panels = grid["panels"]
    if cli.layouts or cli.vocabs or cli.tokens:  # a cross product of the given lists (else the grid's)
        lays = cli.layouts or list(dict.fromkeys(p[0] for p in panels))
        vocabs = cli.vocabs or tuple(dict.fromkeys(p[1] for p in panels))
        tokens = cli.tokens or panels[0][2]
        panels = [(lay, V, tokens) for lay in lays for V in vocabs]
    configs = []
    for H in cli.hidden or (grid["H"],):
        for lay, V, tokens, *rest in panels:
            K, C = LAYOUTS[lay]
            for n in tokens:
                T = max(1, round(n / (cli.B * K)))
                N = cli.B * K * T
                cid = f"{lay}/V{V}/N{N}/H{H}"
                configs.append({"id": cid, "layout": lay, "layout_text": LAYOUT_TEXT[lay], "K": K,
                                "num_chosen": C, "V": V, "H": H, "B": cli.B, "T": T,
                                "tokens": N, "not_in_grid": dict(rest[0]) if rest else {}})  # fmt: skip
    if grid.get("order") == "listed" and not (cli.layouts or cli.vocabs or cli.tokens or cli.hidden):
        return configs
    return sorted(configs, key=work)  # stable: the grid's order among equal work


def elem_bytes(cli):
    return DTYPES[cli.dtype].itemsize


def work(c):
    return c["tokens"] * c["V"] * c["H"]


def measured_rows(record, method):
    return [r for r in record["rows"] if r["method"] == method and r["status"] == "ok"]


def nearest(rows, c):
    """The measured row closest to configuration ``c`` (same V and H first, then the largest work)."""
    same = [r for r in rows if r["V"] == c["V"] and r["H"] == c["H"]] or rows
    return max(same, key=lambda r: r["tokens"] * r["V"] * r["H"]) if same else None


def predict_mem_mb(record, method, c, cli):
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
    return (4 * other * elem_bytes(cli) + 64 * 2**20) / 2**20


def predict_step_s(record, method, c):
    """Seconds of one fwd+bwd of ``method`` on ``c``, scaled by the work N V H from its nearest
    measurement (else from ours, through a prior ratio); None with nothing measured yet."""
    near = nearest(measured_rows(record, method), c)
    if near:
        return near["median_ms"] / 1e3 * work(c) / (near["tokens"] * near["V"] * near["H"])
    for ours in OURS:
        near = nearest(measured_rows(record, ours), c)
        if near:
            scale = work(c) / (near["tokens"] * near["V"] * near["H"])
            return TIME_PRIOR.get(method, 1.0) * near["median_ms"] / 1e3 * scale
    return None


def predict_cost_s(record, methods, c, cli):
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


def row_base(c):
    keys = ("id", "layout", "K", "num_chosen", "V", "H", "B", "T", "tokens")
    return {("config" if k == "id" else k): c[k] for k in keys}


def plan(record, c, methods, cli):
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


def budget_cut(record, c, run_now, later, cli, elapsed):
    """Apply the time budget to ``c``: -> (methods kept, {method: reason dropped}, reason to skip ``c``
    or None)."""
    if not cli.time_budget:
        return run_now, {}, None
    left = cli.time_budget - elapsed
    later_min = 0.0
    later = [(c2, m2) for c2, m2 in later if OPTIONAL not in c2.get("not_in_grid", {})]
    for c2, methods2 in later:
        cost = predict_cost_s(record, [m for m in methods2 if m != "naive-compile"], c2, cli)
        later_min += cost or 0.0
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


def status_of_error(what):
    return "oom" if ("OutOfMemoryError" in what or "out of memory" in what.lower()) else "failed"


def run_config(record, c, run_now, cli):
    """Run ``c``'s methods with bench_head_loss; -> (rows, seconds)."""
    argv = ["--device", cli.device, "--B", c["B"], "--T", c["T"], "--H", c["H"], "--V", c["V"],
            "--K", c["K"], "--num-chosen", c["num_chosen"], "--dtype", cli.dtype, "--reps", cli.reps,
            "--methods", ",".join(run_now)]  # fmt: skip
    N, V, H = c["tokens"], c["V"], c["H"]
    if cli.mem_cap_gb and N * V * elem_bytes(cli) > cli.mem_cap_gb * 2**30 / 2:
        argv += ["--gemm-rows", max(1, int(cli.mem_cap_gb * 2**30 / 2 / (V * elem_bytes(cli))))]
    if cli.no_check:
        argv.append("--no-check")
    argv += cli.bench_args.split()
    args = parse_args([str(a) for a in argv])
    start = time.perf_counter()
    report = run(args, log=lambda line: print("  " + line, flush=True))
    seconds = time.perf_counter() - start
    rows = []
    by = {r["method"]: r for r in report["results"]}
    gemm = by.get(GEMM)
    rows_in_chunk = args.gemm_rows or N
    for m in run_now:
        row = row_base(c)
        row["method"] = m
        if m in by:
            r = by[m]
            row.update(
                status="ok", median_ms=r["median_ms"], times_s=r["times_s"], peak_mem_mb=r["peak_mem_mb"],
                gflops=1e3 * r["tflops"], gflops_6nhv=6 * N * H * V / (r["median_ms"] / 1e3) / 1e9,
                pct_peak_6nhv=r.get("pct_peak_6nhv"),
                speedup_vs_naive=r.get("speedup_vs_naive") if m != GEMM else None,
                mem_vs_naive=r.get("mem_vs_naive"), check=r.get("check"),
            )  # fmt: skip
            if gemm:
                row["gemm_ratio"] = r["median_ms"] / gemm["median_ms"]
                row["pct_of_gemm_rate"] = 100 * gemm["median_ms"] / r["median_ms"]
            if m == GEMM:
                row["gemm_chunks"] = math.ceil(N / rows_in_chunk)
            if r.get("check") and not r["check"].get("ok", True):
                row["status"] = "check failed"
            if cli.mem_cap_gb and r["peak_mem_mb"] and r["peak_mem_mb"] > cli.mem_cap_gb * 1024:
                row["over_cap_measured"] = True
        elif m in report["errors"]:
            row.update(status=status_of_error(report["errors"][m]), reason=report["errors"][m])
        elif m in report["skipped"]:
            row.update(status="skipped", reason=report["skipped"][m])
        else:
            row.update(status="failed", reason="no result")
        rows.append(row)
    return rows, seconds


def fit_exponent(points):
    """Least-squares slope of log(y) on log(x): y ~ x^slope."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def growth(record):
    """Per (layout, V, H, method) with two token counts or more: the log-log slopes of time and memory
    in tokens, and memory's rise per 1k tokens (first to last point)."""
    out = []
    keys = sorted({(r["layout"], r["V"], r["H"], r["method"]) for r in record["rows"] if r["status"] == "ok"})
    for lay, V, H, m in keys:
        rows = sorted(
            (r for r in record["rows"] if r["status"] == "ok" and (r["layout"], r["V"], r["H"], r["method"])
             == (lay, V, H, m)), key=lambda r: r["tokens"],
        )  # fmt: skip
        if len(rows) < 2:
            continue
        entry = {"layout": lay, "V": V, "H": H, "method": m, "tokens": [r["tokens"] for r in rows],
                 "time_exponent": fit_exponent([(r["tokens"], r["median_ms"]) for r in rows])}  # fmt: skip
        mems = [r for r in rows if r.get("peak_mem_mb")]
        if len(mems) >= 2:
            entry["mem_exponent"] = fit_exponent([(r["tokens"], r["peak_mem_mb"]) for r in mems])
            a, b = mems[0], mems[-1]
            entry["mem_mb_per_1k_tokens"] = (
                1e3 * (b["peak_mem_mb"] - a["peak_mem_mb"]) / (b["tokens"] - a["tokens"])
            )
        out.append(entry)
    return out


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    panels = list(dict.fromkeys((r["layout"], r["V"], r["H"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    cap = record.get("mem_cap_gb")
    pairs = 2 if len(panels) > 3 else 1  # panels side by side: (time, memory) pairs per figure row
    nrows = math.ceil(len(panels) / pairs)
    fig, grid = plt.subplots(nrows, 2 * pairs, figsize=(10.5 * pairs, 3.2 * nrows + 0.8), squeeze=False)
    axes = [
        (grid[i // pairs][2 * (i % pairs)], grid[i // pairs][2 * (i % pairs) + 1]) for i in range(len(panels))
    ]
    for ax in grid.flat[2 * len(panels) :]:
        ax.axis("off")
    for (lay, V, H), (ax_t, ax_m) in zip(panels, axes, strict=True):
        ticks = sorted({r["tokens"] for r in rows if (r["layout"], r["V"], r["H"]) == (lay, V, H)})
        for m in methods:
            mine = sorted((r for r in rows if (r["layout"], r["V"], r["H"], r["method"]) == (lay, V, H, m)),
                          key=lambda r: r["tokens"])  # fmt: skip
            ok = [r for r in mine if r["status"] == "ok"]
            style = dict(color=colors[m], marker="o", ms=4, lw=2.2 if m in OURS else 1.2,
                         ls="--" if m == GEMM else "-")  # fmt: skip
            if ok:
                ax_t.plot([r["tokens"] for r in ok], [r["median_ms"] / 1e3 for r in ok], label=m, **style)
                mem = [r for r in ok if r.get("peak_mem_mb")]
                if mem:
                    ax_m.plot([r["tokens"] for r in mem], [r["peak_mem_mb"] for r in mem], label=m, **style)
            over = [r for r in mine if r["status"] == "over cap" and r.get("predicted_mem_mb")]
            if over:  # predicted, not run: hollow markers, dotted
                last = [r for r in ok if r.get("peak_mem_mb")][-1:]
                xs = [r["tokens"] for r in last + over]
                ys = [r["peak_mem_mb"] for r in last] + [r["predicted_mem_mb"] for r in over]
                ax_m.plot(xs, ys, color=colors[m], ls=":", marker="o", mfc="none", ms=6,
                          label=f"{m} (over cap, predicted)")  # fmt: skip
        if cap:
            ax_m.axhline(cap * 1024, color="k", lw=0.8, ls="--")
            ax_m.text(
                0.01,
                cap * 1024,
                f"cap {cap:g} GiB",
                va="bottom",
                fontsize=7,
                transform=ax_m.get_yaxis_transform(),
            )
        title = f"{LAYOUT_TEXT[lay]}, V={V}, H={H}"
        for ax, ylabel in ((ax_t, "fwd+bwd median (s)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=8)
            ax.grid(True, which="both", lw=0.3)
        for ax in (ax_t, ax_m):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle(
        f"{record['machine']['device']} | {record['dtype']}, {record['B']} prompts, "
        f"median of {record['reps']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def print_table(record):
    print(f"\n{record['machine']['device']}; {record['dtype']}; median of {record['reps']}; "
          f"memory cap {record.get('mem_cap_gb')} GiB")  # fmt: skip
    print(f"{'layout':<9}{'V':>7}{'H':>6}{'tokens':>7}  {'method':<15}{'status':<13}{'median s':>9}"
          f"{'peak MiB':>9}{'vs naive':>9}{'GFLOP/s':>10}{'/gemm':>7}  note")  # fmt: skip
    for r in record["rows"]:
        su = r.get("speedup_vs_naive")
        note = r.get("reason", "")[:70]
        print(
            f"{r['layout']:<9}{r['V']:>7}{r['H']:>6}{r['tokens']:>7}  {r['method']:<15}{r['status']:<13}"
            f"{fmt(r.get('median_ms') and r['median_ms'] / 1e3, '.3f'):>9}"
            f"{fmt(r.get('peak_mem_mb'), '.0f'):>9}"
            f"{fmt(su, '.2f') + ('x' if su else ''):>9}{fmt(r.get('gflops_6nhv'), '.1f'):>10}"
            f"{fmt(r.get('gemm_ratio'), '.2f'):>7}  {note}"
        )
    for g in record.get("growth", []):
        if g["method"] in ("naive-eager", *OURS, GEMM):
            print(f"growth {g['layout']} V={g['V']} {g['method']}: "
                  f"time ~ N^{fmt(g['time_exponent'], '.2f')}, "
                  f"memory ~ N^{fmt(g.get('mem_exponent'), '.2f')} "
                  f"({fmt(g.get('mem_mb_per_1k_tokens'), '.0f')} MiB per 1k tokens)")  # fmt: skip


def markdown(record) -> str:
    """One table row per configuration: each method's time and peak memory (or its status), ours against
    naive and against the GEMMs alone, ours in GFLOP/s (6 N H V)."""
    methods = [m for m in dict.fromkeys(r["method"] for r in record["rows"]) if m != GEMM]
    head = ["layout", "V", "tokens", *methods, "GEMMs alone", "ours vs naive", "ours / GEMMs", "ours GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(LAYOUTS)
    for c in sorted(record["configs"], key=lambda c: (c["V"], order.index(c["layout"]), c["tokens"])):
        by = {r["method"]: r for r in record["rows"] if r["config"] == c["id"]}
        cells = [c["layout"], str(c["V"]), str(c["tokens"])]
        for m in methods:
            r = by.get(m)
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                mem = f", {r['peak_mem_mb']:.0f} MiB" if r.get("peak_mem_mb") is not None else ""
                cells.append(f"{r['median_ms'] / 1e3:.2f} s{mem}")
            elif r["status"] == "over cap" and r.get("predicted_mem_mb"):
                cells.append(f"over cap ({r['predicted_mem_mb'] / 1024:.1f} GiB pred.)")
            elif r["status"] == "skipped":
                why = r.get("reason", "")
                cells.append("time budget" if why.startswith("time budget") else "n/a")
            else:
                cells.append(r["status"])
        g = by.get(GEMM)
        cells.append(f"{g['median_ms'] / 1e3:.2f} s" if g and g["status"] == "ok" else "-")
        ours = next((by[m] for m in OURS if m in by and by[m]["status"] == "ok"), None)
        su = ours and ours.get("speedup_vs_naive")
        cells.append(f"{su:.2f}x" if su else "-")
        cells.append(f"{ours['gemm_ratio']:.2f}" if ours and ours.get("gemm_ratio") else "-")
        cells.append(f"{ours['gflops_6nhv']:.0f}" if ours else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", choices=GRIDS, default=None, help="default: cpu on a CPU, gpu on CUDA")
    p.add_argument("--out", default="benchmarks/results/sweep_{device}.json", help="{device}: cpu, h100, ...")
    p.add_argument("--layouts", type=lambda t: [layout_of(x) for x in t.split(",") if x], default=None,
                   help=f"comma-separated of {', '.join(LAYOUTS)} (a cross product with "
                   "--vocabs, --tokens)")  # fmt: skip
    p.add_argument("--vocabs", type=ints, default=None)
    p.add_argument("--tokens", type=ints, default=None, help="N = B x K x T (T rounded)")
    p.add_argument("--hidden", type=ints, default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--B", type=int, default=None, help="prompts")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--methods", default=None, help="comma-separated bench_head_loss methods")
    p.add_argument(
        "--mem-cap-gb", type=float, default=None, help="CPU default 2.75; CUDA: 90%% of the device"
    )
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole sweep")
    p.add_argument("--no-check", action="store_true", help="skip the loss/gradient check")
    p.add_argument("--bench-args", default="", help="more bench_head_loss arguments, e.g. '--memory-inproc'")
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from --out's JSON")
    p.add_argument("--markdown", action="store_true", help="with --replot: print a Markdown table too")
    cli = p.parse_args(argv)
    cli.grid = cli.grid or ("gpu" if cli.device == "cuda" else "cpu")
    grid = GRIDS[cli.grid]
    cli.dtype = cli.dtype or grid["dtype"]
    cli.B = cli.B or grid["B"]
    cli.reps = cli.reps or grid["reps"]
    cli.methods = [
        m for m in (cli.methods or METHODS["cuda" if cli.device == "cuda" else "cpu"]).split(",") if m
    ]
    if cli.time_budget is None:
        cli.time_budget = grid["time_budget"]
    if cli.mem_cap_gb is None:
        cli.mem_cap_gb = grid["mem_cap_gb"]
        if cli.device == "cuda" and torch.cuda.is_available():
            cli.mem_cap_gb = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    return cli


def main(argv=None):
    cli = parse(argv)
    t0 = time.perf_counter()
    out = Path(cli.out.format(device=device_tag(cli.device)))
    png = out.with_suffix(".png")
    if cli.replot:
        import json

        record = json.loads(out.read_text())
        plot(record, png)
        print_table(record)
        if cli.markdown:
            print("\n" + markdown(record))
        print(f"wrote {png}")
        return 0
    configs = make_configs(cli)
    record = {
        "machine": machine(cli.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv), "grid": cli.grid, "dtype": cli.dtype, "B": cli.B, "reps": cli.reps,
        "mem_cap_gb": cli.mem_cap_gb, "time_budget_s": cli.time_budget, "methods": cli.methods,
        "flops": "6 N H V per fwd+bwd (logits, dX, dW), all N rows; gflops counts 8 N H V for two-pass peers",
        "gemm_ratio": "step time / gemm-only time on the same configuration (GEMMs alone = 1.0)",
        "layouts": LAYOUT_TEXT, "configs": [], "rows": [],
    }  # fmt: skip
    bad = []
    for i, c in enumerate(configs):
        run_now, not_run = plan(record, c, cli.methods, cli)  # the predictions use what ran so far
        later = [(c2, plan(record, c2, cli.methods, cli)[0]) for c2 in configs[i + 1 :]]
        elapsed = time.perf_counter() - t0
        kept, dropped, skip = budget_cut(record, c, run_now, later, cli, elapsed)
        entry = dict(c)
        print(f"\n== [{i + 1}/{len(configs)}] {c['id']} ({LAYOUT_TEXT[c['layout']]}, T={c['T']}) "
              f"at {elapsed:.0f} s", flush=True)  # fmt: skip
        rows = []
        for m, why in dropped.items():
            not_run[m] = ("skipped", why)
        if skip:
            entry.update(status="skipped", reason=skip)
            for m in run_now:
                not_run[m] = ("skipped", skip)
        elif kept:
            try:
                rows, seconds = run_config(record, c, kept, cli)
                entry.update(status="done", seconds=seconds)
            except Exception as err:  # a bug or a crash of the whole configuration: record, go on
                what = f"{type(err).__name__}: {str(err).strip()[:500]}"
                entry.update(status="failed", reason=what)
                rows = [
                    {**row_base(c), "method": m, "status": status_of_error(what), "reason": what}
                    for m in kept
                ]
        else:
            entry.update(status="done", seconds=0.0, note="no method to run here")
        for m, (status, why) in not_run.items():
            row = {**row_base(c), "method": m, "status": status, "reason": why}
            if status == "over cap":
                row["predicted_mem_mb"] = predict_mem_mb(record, m, c, cli)
            rows.append(row)
        order = {m: j for j, m in enumerate(cli.methods)}
        rows.sort(key=lambda r: order.get(r["method"], len(order)))
        for r in rows:
            what = (
                f"{r['median_ms'] / 1e3:.3f} s, {fmt(r.get('peak_mem_mb'), '.0f')} MiB"
                if "median_ms" in r
                else r.get("reason", "")[:100]
            )
            print(f"  {r['method']:<15}{r['status']:<13}{what}", flush=True)
            if r["method"] in OURS and r["status"] in ("failed", "check failed"):
                bad.append(f"{c['id']} {r['method']}: {r['status']} {r.get('reason', '')}")
        record["configs"].append(entry)
        record["rows"].extend(rows)
        record["growth"] = growth(record)
        record["wall_s"] = time.perf_counter() - t0
        write_json(out, record)  # after every configuration: a killed sweep keeps what it measured
    record["wall_s"] = time.perf_counter() - t0
    write_json(out, record)
    plot(record, png)
    print_table(record)
    done = sum(c["status"] == "done" for c in record["configs"])
    print(
        f"\n{done} of {len(configs)} configurations in {time.perf_counter() - t0:.0f} s; "
        f"wrote {out} and {png}"
    )
    for b in bad:
        print(f"FAILED {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
