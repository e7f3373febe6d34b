"""How the fused head loss's cost grows: tokens, responses per prompt (K, two K = 4 layouts), vocabulary.

One script for the CPU and the GPU. Each configuration (a layout, V, a token count, H) runs
the head-loss methods (methods.py) side by side, interleaved round-robin in one process (median of --reps
fwd+bwd steps after a warm-up, with the loss/gradient check of checks.py; CPU memory: peak RSS rise in
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
positions included; they are 1 in T); the head comparison's ``tflops`` counts 8 N H V for the two-pass
peers. ``gemm_ratio`` = a method's step time / gemm-only's time on the same configuration (1.0 would
be the GEMMs alone: the distance to this machine's limit for a method that computes the logits once).

Memory cap (--mem-cap-gb): before a method runs, its peak is predicted from its own measurements at
smaller sizes (the logits-sized methods scale with N V, the others with (N + V) H) or, with none yet,
from a prior (predictor.py); a method predicted over the cap is recorded "over cap" with the
prediction, not run.
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
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import head_options
import sweep_report
import torch
from harness import error_text
from head_compare import run
from head_options import HeadOptions, select_methods
from methods import DTYPES, GEMM, OURS
from plots import growth_plot
from predictor import budget_cut, plan, predict_mem_mb
from records import device_tag, kernel_machine, write_json
from sweep_grid import GRIDS, LAYOUT_TEXT, LAYOUTS, METHODS, ints, layout_of, make_configs, row_base

FLOPS_TEXT = "6 N H V per fwd+bwd (logits, dX, dW), all N rows; gflops counts 8 N H V for two-pass peers"
GEMM_RATIO_TEXT = "step time / gemm-only time on the same configuration (GEMMs alone = 1.0)"


def status_of_error(what: str) -> str:
    return "oom" if ("OutOfMemoryError" in what or "out of memory" in what.lower()) else "failed"


def head_opts(c: dict, run_now: list[str], cli) -> HeadOptions:
    """The head comparison of configuration ``c``; the GEMM floor in row chunks when one [N, V] buffer
    would not fit in half the memory cap; ``--bench-args`` over all that."""
    opts = HeadOptions(
        device=cli.device,
        B=c["B"],
        T=c["T"],
        H=c["H"],
        V=c["V"],
        K=c["K"],
        num_chosen=c["num_chosen"],
        dtype=cli.dtype,
        reps=cli.reps,
        methods=list(run_now),
        no_check=cli.no_check,
    )
    itemsize = DTYPES[cli.dtype].itemsize
    if cli.mem_cap_gb and c["tokens"] * c["V"] * itemsize > cli.mem_cap_gb * 2**30 / 2:
        opts.gemm_rows = max(1, int(cli.mem_cap_gb * 2**30 / 2 / (c["V"] * itemsize)))
    opts = dataclasses.replace(opts, **head_options.overrides(cli.bench_args.split()))
    select_methods(opts, explicit=True)
    return opts


def result_row(c: dict, m: str, r: dict, gemm: dict | None, opts: HeadOptions, cli) -> dict:
    """A measured method's row: the head comparison's figures, GFLOP/s at 6 N H V, against the GEMMs."""
    N, V, H = c["tokens"], c["V"], c["H"]
    row = {
        **row_base(c),
        "method": m,
        "status": "ok",
        "median_ms": r["median_ms"],
        "times_s": r["times_s"],
        "peak_mem_mb": r["peak_mem_mb"],
        "gflops": 1e3 * r["tflops"],
        "gflops_6nhv": 6 * N * H * V / (r["median_ms"] / 1e3) / 1e9,
        "pct_peak_6nhv": r.get("pct_peak_6nhv"),
        "speedup_vs_naive": r.get("speedup_vs_naive") if m != GEMM else None,
        "mem_vs_naive": r.get("mem_vs_naive"),
        "check": r.get("check"),
    }
    if gemm:
        row["gemm_ratio"] = r["median_ms"] / gemm["median_ms"]
        row["pct_of_gemm_rate"] = 100 * gemm["median_ms"] / r["median_ms"]
    if m == GEMM:
        row["gemm_chunks"] = math.ceil(N / (opts.gemm_rows or N))
    if r.get("check") and not r["check"].get("ok", True):
        row["status"] = "check failed"
    if cli.mem_cap_gb and r["peak_mem_mb"] and r["peak_mem_mb"] > cli.mem_cap_gb * 1024:
        row["over_cap_measured"] = True
    return row


def run_config(c: dict, run_now: list[str], cli) -> tuple[list[dict], float]:
    """Run ``c``'s methods side by side; -> (a row per method, seconds)."""
    opts = head_opts(c, run_now, cli)
    start = time.perf_counter()
    report = run(opts, log=lambda line: print("  " + line, flush=True))
    seconds = time.perf_counter() - start
    by = {r["method"]: r for r in report["results"]}
    rows = []
    for m in run_now:
        if m in by:
            rows.append(result_row(c, m, by[m], by.get(GEMM), opts, cli))
            continue
        row = {**row_base(c), "method": m}
        if m in report["errors"]:
            row.update(status=status_of_error(report["errors"][m]), reason=report["errors"][m])
        elif m in report["skipped"]:
            row.update(status="skipped", reason=report["skipped"][m])
        else:
            row.update(status="failed", reason="no result")
        rows.append(row)
    return rows, seconds


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", choices=GRIDS, default=None, help="default: cpu on a CPU, gpu on CUDA")
    p.add_argument("--out", default="benchmarks/results/sweep_{device}.json", help="{device}: cpu, h100, ...")
    layouts_help = f"comma-separated of {', '.join(LAYOUTS)} (a cross product with --vocabs, --tokens)"
    p.add_argument(
        "--layouts", type=lambda t: [layout_of(x) for x in t.split(",") if x], default=None, help=layouts_help
    )
    p.add_argument("--vocabs", type=ints, default=None)
    p.add_argument("--tokens", type=ints, default=None, help="N = B x K x T (T rounded)")
    p.add_argument("--hidden", type=ints, default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--B", type=int, default=None, help="prompts")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--methods", default=None, help="comma-separated bench_head_loss methods")
    cap_help = "CPU default 2.75; CUDA: 90%% of the device"
    p.add_argument("--mem-cap-gb", type=float, default=None, help=cap_help)
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
    default_methods = METHODS["cuda" if cli.device == "cuda" else "cpu"]
    cli.methods = [m for m in (cli.methods or default_methods).split(",") if m]
    if cli.time_budget is None:
        cli.time_budget = grid["time_budget"]
    if cli.mem_cap_gb is None:
        cli.mem_cap_gb = grid["mem_cap_gb"]
        if cli.device == "cuda" and torch.cuda.is_available():
            cli.mem_cap_gb = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    return cli


def plot(record: dict, path: Path) -> None:
    growth_plot(record, path, panel_title=LAYOUT_TEXT.__getitem__, bold=OURS, dashed=GEMM)


def replot(cli, out: Path, png: Path) -> int:
    record = json.loads(out.read_text())
    plot(record, png)
    sweep_report.print_table(record)
    if cli.markdown:
        print("\n" + sweep_report.markdown(record))
    print(f"wrote {png}")
    return 0


def new_record(cli) -> dict:
    return {
        "machine": kernel_machine(cli.device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "grid": cli.grid,
        "dtype": cli.dtype,
        "B": cli.B,
        "reps": cli.reps,
        "mem_cap_gb": cli.mem_cap_gb,
        "time_budget_s": cli.time_budget,
        "methods": cli.methods,
        "flops": FLOPS_TEXT,
        "gemm_ratio": GEMM_RATIO_TEXT,
        "layouts": LAYOUT_TEXT,
        "configs": [],
        "rows": [],
    }


def measure(record: dict, c: dict, run_now: list[str], not_run: dict, skip: str | None, cli):
    """Run (or skip) configuration ``c``: -> (its entry in ``configs``, its rows, not yet recorded)."""
    entry = dict(c)
    rows = []
    if skip:
        entry.update(status="skipped", reason=skip)
        for m in run_now:
            not_run[m] = ("skipped", skip)
    elif run_now:
        try:
            rows, seconds = run_config(c, run_now, cli)
            entry.update(status="done", seconds=seconds)
        except Exception as err:  # a bug or a crash of the whole configuration: record, go on
            what = error_text(err)
            entry.update(status="failed", reason=what)
            rows = [
                {**row_base(c), "method": m, "status": status_of_error(what), "reason": what} for m in run_now
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
    return entry, rows


def main(argv=None) -> int:
    cli = parse(argv)
    t0 = time.perf_counter()
    out = Path(cli.out.format(device=device_tag(cli.device)))
    png = out.with_suffix(".png")
    if cli.replot:
        return replot(cli, out, png)
    configs = make_configs(cli)
    record = new_record(cli)
    bad = []
    for i, c in enumerate(configs):
        run_now, not_run = plan(record, c, cli.methods, cli)  # the predictions use what ran so far
        later = [(c2, plan(record, c2, cli.methods, cli)[0]) for c2 in configs[i + 1 :]]
        elapsed = time.perf_counter() - t0
        kept, dropped, skip = budget_cut(record, c, run_now, later, cli, elapsed)
        where = f"{c['id']} ({LAYOUT_TEXT[c['layout']]}, T={c['T']})"
        print(f"\n== [{i + 1}/{len(configs)}] {where} at {elapsed:.0f} s", flush=True)
        not_run.update((m, ("skipped", why)) for m, why in dropped.items())
        entry, rows = measure(record, c, run_now if skip else kept, not_run, skip, cli)
        for r in rows:
            if "median_ms" in r:
                what = f"{r['median_ms'] / 1e3:.3f} s, {sweep_report.fmt(r.get('peak_mem_mb'), '.0f')} MiB"
            else:
                what = r.get("reason", "")[:100]
            print(f"  {r['method']:<15}{r['status']:<13}{what}", flush=True)
            if r["method"] in OURS and r["status"] in ("failed", "check failed"):
                bad.append(f"{c['id']} {r['method']}: {r['status']} {r.get('reason', '')}")
        record["configs"].append(entry)
        record["rows"].extend(rows)
        record["growth"] = sweep_report.growth(record)
        record["wall_s"] = time.perf_counter() - t0
        write_json(out, record)  # after every configuration: a killed sweep keeps what it measured
    record["wall_s"] = time.perf_counter() - t0
    write_json(out, record)
    plot(record, png)
    sweep_report.print_table(record)
    done = sum(c["status"] == "done" for c in record["configs"])
    seconds = time.perf_counter() - t0
    print(f"\n{done} of {len(configs)} configurations in {seconds:.0f} s; wrote {out} and {png}")
    for b in bad:
        print(f"FAILED {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
