"""One head-loss comparison: build, warm up and check every method, time them interleaved, measure
their peak memory, and derive the figures results files carry (see bench_head_loss.py's doc).

Memory: CUDA (or ``memory_inproc``): in this process, on the timed inputs; CPU: a fresh process per
method (``python benchmarks/head_compare.py METHOD OPTIONS_JSON``), where the peak RSS rise is not
blurred by the pages the other methods left behind. ``extra_mem_mb`` is the peak less the gradients'
own memory (dX and dW in the working dtype): what a method costs beyond the unavoidable.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import methods
import torch
from checks import check_errors, check_reference, fmt_check, grade_checks
from harness import error_text, interleaved, memory_in_child, peak_memory_mb
from head_options import HeadOptions
from methods import BUILD_ORDER, DTYPES, GEMM, TWO_PASS, shape_of
from records import peak_bf16_tflops

from wrpo_kernels import native

BUILD_SHARE = 0.45  # of the time budget: methods not built (and warmed up) by then are skipped


def step_memory_mb(method: str, opts: HeadOptions, built=None) -> float:
    """Peak memory of one fwd+bwd above what the inputs already hold, in MiB. ``built``: the method
    already built and warmed up on its inputs (default: built here)."""
    if built is None:
        built = methods.build(method, opts)
        if method == "naive-compile" or opts.device == "cuda":
            built.step()  # compile / lazy init outside the measurement
    built.clear()  # the warm-up's gradients are no part of the base: the measured step makes its own
    if opts.device == "cpu" and method.startswith("wrpo-torch"):
        native.row_kernels_enabled(torch.device("cpu"))  # load the native library outside the measurement
    if method == "trl-chunked":
        importlib.import_module("trl.trainer.utils")  # its backward imports this on first use
    return peak_memory_mb(built.step, opts.device)


def child_memory_mb(method: str, opts: HeadOptions) -> float:
    """:func:`step_memory_mb` in a fresh process (the module doc says why)."""
    return memory_in_child([sys.executable, __file__, method, json.dumps(opts.to_json())], method)


def build_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda m: BUILD_ORDER.index(m) if m in BUILD_ORDER else len(BUILD_ORDER))


def prepare(opts: HeadOptions, log: Callable[[str], None]):
    """Build, warm up and check every method (CUDA / ``memory_inproc``: measure its memory too).

    -> (steps {method: step}, mem {method: MiB or None}, checks {method: errors},
    errors {method: message}, skipped {method: reason})."""
    inputs, refs, steps, mem, checks, errors, skipped = {}, {}, {}, {}, {}, {}, {}
    t0 = time.perf_counter()
    for m in build_order(opts.methods):
        if opts.time_budget and time.perf_counter() - t0 > BUILD_SHARE * opts.time_budget:
            skipped[m] = f"time budget: {opts.time_budget:.0f} s (building the others took 45% of it)"
            log(f"skip {m}: {skipped[m]}")
            continue
        K, C, with_ref = shape_of(m, opts)
        try:
            if K not in inputs:
                inputs[K] = methods.make_inputs(opts, K)
            built = methods.build(m, opts, inputs[K])
            for _ in range(max(opts.warmup, 1)):
                loss = built.step()
            if not opts.no_check and m != GEMM:
                key = (K, with_ref)
                if key not in refs:
                    refs[key] = check_reference(inputs[K], with_ref, C, methods.ALPHA, methods.BETA)
                checks[m] = {**check_errors(loss, built.grads(), refs[key]), "reference": refs[key]["name"]}
            if m == GEMM:
                mem[m] = None
            elif opts.device == "cuda" or opts.memory_inproc:
                mem[m] = step_memory_mb(m, opts, built)
            built.clear()
            steps[m] = built.step
        except Exception as err:  # record it, go on with the others
            errors[m] = error_text(err)
            log(f"error in {m}: {errors[m]}")
            if opts.device == "cuda":
                torch.cuda.empty_cache()
    return steps, mem, checks, errors, skipped


def baseline_of(method: str, opts: HeadOptions) -> str:
    """The naive method on the same tokens: naive-eager/k2 for the /k2 methods (naive-eager when
    --K 2 and naive-eager/k2 is not run), naive-eager for the others."""
    if method.endswith("/k2") and (opts.K != 2 or "naive-eager/k2" in opts.methods):
        return "naive-eager/k2"
    return "naive-eager"


def result_row(m: str, times: list[float], mem_mb, check, opts: HeadOptions, peak) -> dict:
    """A method's figures: times, median, TFLOP/s (6NHV, 8NHV for two-pass), % of peak, memory."""
    K, C, _ = shape_of(m, opts)
    N = opts.B * K * opts.T
    median_s = statistics.median(times)
    grads_mb = (N + opts.V) * opts.H * DTYPES[opts.dtype].itemsize / 2**20  # dX and dW
    flops6 = 6 * N * opts.H * opts.V
    return {
        "method": m,
        "K": K,
        "num_chosen": C,
        "tokens": N,
        "times_s": times,
        "median_ms": 1e3 * median_s,
        "tflops": (8 if m in TWO_PASS else 6) * N * opts.H * opts.V / median_s / 1e12,
        "pct_peak_6nhv": 100 * flops6 / median_s / 1e12 / peak if peak else None,
        "peak_mem_mb": mem_mb,
        "extra_mem_mb": mem_mb - grads_mb if mem_mb is not None else None,
        "baseline": baseline_of(m, opts),
        "check": check,
    }


def add_comparisons(results: list[dict], opts: HeadOptions) -> None:
    """Each result against its naive baseline, naive-compile, Liger (K = 2) and its -nocsrc twin."""
    by = {r["method"]: r for r in results}
    for r in results:
        b = by.get(r["baseline"])
        r["speedup_vs_naive"] = b["median_ms"] / r["median_ms"] if b else None
        measured = b and r["peak_mem_mb"] is not None and b["peak_mem_mb"] > 0
        r["mem_vs_naive"] = r["peak_mem_mb"] / b["peak_mem_mb"] if measured else None
        c = by.get("naive-compile") if r["K"] == shape_of("", opts)[0] else None
        r["speedup_vs_compile"] = c["median_ms"] / r["median_ms"] if c else None
        lg = by.get("liger-dpo/k2") if r["K"] == 2 else None
        r["speedup_vs_liger"] = lg["median_ms"] / r["median_ms"] if lg else None
        twin = by.get(r["method"] + "-nocsrc")
        if twin:  # the csrc row kernels against the pure-torch rows, round by round
            ratios = sorted(u / t for t, u in zip(r["times_s"], twin["times_s"], strict=True))
            r["paired_speedup_vs_nocsrc"] = {
                "median": statistics.median(ratios),
                "min": ratios[0],
                "max": ratios[-1],
            }


def run(opts: HeadOptions, log: Callable[[str], None] = print) -> dict:
    """Time (interleaved), check and measure memory of ``opts.methods``.

    -> {"results": one dict per measured method, "skipped": {method: why}, "errors": {method: what}}."""
    for m, reason in opts.skipped.items():
        log(f"skip {m}: {reason}")
    steps, mem, checks, errors, skipped = prepare(opts, log)
    ran = [m for m in opts.methods if m in steps]
    rounds = interleaved({m: steps[m] for m in ran}, opts.reps, opts.device, log)
    errors.update(rounds.errors)
    steps.clear()
    if opts.device == "cuda":
        torch.cuda.empty_cache()
    for m in rounds.wall:
        if m in mem:
            continue
        try:
            mem[m] = child_memory_mb(m, opts)
        except Exception as err:
            errors[m] = f"memory: {error_text(err)}"
            log(f"error in {m}: {errors[m]}")
    peak = opts.peak_tflops or peak_bf16_tflops(opts.device)
    results = [
        result_row(m, rounds.wall[m], mem[m], checks.get(m), opts, peak)
        for m in opts.methods
        if rounds.wall.get(m) and m in mem
    ]
    grade_checks(results, opts.dtype, own_bar=("liger-dpo/k2",))
    add_comparisons(results, opts)
    return {"results": results, "skipped": {**opts.skipped, **skipped}, "errors": errors}


def failures(report: dict) -> list[str]:
    """Our methods (wrpo-*) that failed to run or failed the check: what makes the run fail."""
    bad = [f"{m}: {e}" for m, e in report["errors"].items() if m.startswith("wrpo-")]
    for r in report["results"]:
        if r["method"].startswith("wrpo-") and r.get("check") and not r["check"]["ok"]:
            bad.append(f"{r['method']}: check failed {fmt_check(r['check'])}")
    return bad


if __name__ == "__main__":  # a memory child: METHOD OPTIONS_JSON -> the peak in MiB on the last line
    print(step_memory_mb(sys.argv[1], HeadOptions(**json.loads(sys.argv[2]))))
