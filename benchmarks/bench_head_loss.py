"""Fused LM head + preference loss: fwd+bwd time and peak memory of every backend and its peers.

Methods (same tokens, same dtype, precomputed reference log-probs):
  naive-eager      wrpo_kernels.reference: full [N, V] logits, log_softmax, gather (K responses)
  naive-compile    the same under torch.compile (--compile-backend, default inductor)
  wrpo-torch       wrpo_kernels backend="torch" (chunked single pass; on CPU its row work runs in the
                   native kernels of csrc/ when they build, see wrpo_kernels.native)
  wrpo-torch-nocsrc  the same with the pure-torch row ops (wrpo_kernels.native.disabled(); CPU only by
                   default: on CUDA it is wrpo-torch)
  wrpo-triton      wrpo_kernels backend="triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1)
  cce-logps        cut-cross-entropy per-token log-probs (reduction="none"), summed per sequence,
                   then wrpo_kernels.wrpo_loss (CUDA only; a peer for the log-prob part)
  trl-chunked      TRL's own two-pass chunked head (trl.kernels.ChunkedLogProbFunction, with the vocabulary
                   chunk TRL's DPO trainer passes, 32768) on the labelled rows: per-token log-probs,
                   summed per sequence, then wrpo_kernels.wrpo_loss
  and, on K = 2 (chosen = the target pick, rejected) since Liger takes pairs only:
  naive-eager/k2, wrpo-torch/k2, wrpo-triton/k2, liger-dpo/k2 (LigerFusedLinearDPOLoss, use_ref_model=False)
  gemm-only        not a loss, and only when named in --methods: the three GEMMs of the head's step alone,
                   logits = X W^T, dX = G W, dW = G^T X on the same N rows, dtype and device (G is the
                   logits buffer reused; in row chunks of --gemm-rows, times summed): the machine's own
                   GEMM rate at this shape, a floor for any method that computes the logits once

--K / --num-chosen set the layout of the methods without /k2 (default 3 responses, 2 chosen): e.g.
--K 4 --num-chosen 2 (two chosen, two rejected) or --num-chosen 3 (three chosen, one rejected), with
the default chosen weights (the sources share alpha, the target gets 1 - alpha; rejected: their mean).

A method whose package is missing (liger-kernel, cut-cross-entropy, trl) or that cannot run on the
device is skipped with a line saying why; one that fails while running is recorded and the others go on
(exit code 1 at the end if one of ours, wrpo-*, failed).

Check: after its warm-up, every method's loss, dL/dhidden and dL/dweight are compared (relative
Frobenius error) with a reference on the same inputs: the naive path in fp64 on small shapes, the torch
backend in fp32 on large ones (liger-dpo/k2 against the same loss without reference log-probs, which is
what use_ref_model=False computes). A method passes if its error is at most the dtype's tolerance
(fp32 1e-4, fp16/bf16 3e-2) or twice the naive path's in the same dtype.

TFLOP/s is the model's work over the time: 6NHV for every method but the two-pass ones, cce-logps
and trl-chunked (8NHV: their backward recomputes the logits). ``pct_peak_6nhv`` is 6NHV over the time
against the device's dense bf16 peak (--peak-tflops, or a table of known GPUs).

Time: median of --reps fwd+bwd calls after a warm-up, methods interleaved round-robin in one process,
the order rotated every round (use a multiple of the number of methods). ``paired_speedup_vs_nocsrc`` of
wrpo-torch is the median over rounds of (wrpo-torch-nocsrc time / wrpo-torch time), when both run.
Memory: CUDA: max allocated above the inputs; CPU: peak RSS rise over one fwd+bwd in a fresh process
(VmHWM reset through /proc/self/clear_refs, large allocations forced to mmap so frees are returned).
``extra_mem_mb`` is that peak less the gradients' own memory (dX and dW in the working dtype).

    python benchmarks/bench_head_loss.py                     # the CPU acceptance shape
    python benchmarks/bench_head_loss.py --device cuda --H 4096 --V 128256 --T 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from checks import fmt_check
from head_compare import failures, run
from head_options import HeadOptions, add_arguments, options_from
from plots import bar_plot
from records import device_tag, kernel_machine, write_json


def parse_cli(argv=None) -> tuple[HeadOptions, str | None]:
    """-> (the comparison's options, --out)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    out_help = "JSON path, {device} is filled in (cpu, h100, ...; a .png plot is written beside it)"
    p.add_argument("--out", default=None, help=out_help)
    ns = p.parse_args(argv)
    return options_from(ns, p), ns.out


def parse_args(argv=None) -> HeadOptions:
    return parse_cli(argv)[0]


def print_table(results: list[dict], opts: HeadOptions, report: dict | None = None) -> None:
    info = kernel_machine(opts.device)
    native = info.get("native_row_kernels")
    native_note = f"; native row kernels: {native}" if native is not None else ""
    run_note = f"shape {opts.shape()}; dtype {opts.dtype}; median of {opts.reps}"
    print(f"device: {info['device']}{native_note}; {run_note}")
    print(
        f"{'method':<19}{'tokens':>8}{'median ms':>11}{'TFLOP/s':>9}{'%peak':>7}{'peak MiB':>10}"
        f"{'extra MiB':>10}{'speed-up':>10}{'mem ratio':>10}  check (rel. err vs reference)"
    )
    for r in results:
        su = f"{r['speedup_vs_naive']:.2f}x" if r["speedup_vs_naive"] else "-"
        mr = f"{r['mem_vs_naive']:.3f}" if r["mem_vs_naive"] else "-"
        pp = f"{r['pct_peak_6nhv']:.0f}" if r.get("pct_peak_6nhv") else "-"
        pk = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        ex = f"{round(r['extra_mem_mb']) + 0}" if r["extra_mem_mb"] is not None else "-"
        c = r.get("check")
        verdict = ("ok " if c["ok"] else "FAIL ") + fmt_check(c) if c else "-"
        print(
            f"{r['method']:<19}{r['tokens']:>8}{r['median_ms']:>11.1f}{r['tflops']:>9.2f}{pp:>7}"
            f"{pk:>10}{ex:>10}{su:>10}{mr:>10}  {verdict}"
        )
    for r in results:
        if p := r.get("paired_speedup_vs_nocsrc"):
            print(
                f"{r['method']} vs {r['method']}-nocsrc, median of per-round ratios: {p['median']:.2f}x "
                f"(rounds {p['min']:.2f}x to {p['max']:.2f}x)"
            )
    if report:
        for m, why in report["skipped"].items():
            print(f"skipped {m}: {why}")
        for m, what in report["errors"].items():
            print(f"failed {m}: {what}")
        refs = sorted({r["check"]["reference"] for r in results if r.get("check")})
        if refs:
            print(f"check reference: {'; '.join(refs)}")


def plot(results: list[dict], path: Path, title: str) -> None:
    panels = [("median_ms", "fwd+bwd median (ms)"), ("peak_mem_mb", "peak memory (MiB)")]
    rows = [{**r, "peak_mem_mb": r["peak_mem_mb"] or 0} for r in results]  # gemm-only: not measured
    bar_plot(rows, path, title, panels, highlight=lambda m: m.startswith("wrpo"))


def main(argv=None) -> int:
    opts, out = parse_cli(argv)
    report = run(opts)
    results = report["results"]
    print_table(results, opts, report)
    if out:
        path = Path(out.format(device=device_tag(opts.device)))
        record = {
            "machine": kernel_machine(opts.device),
            "shape": opts.shape(),
            "dtype": opts.dtype,
            "reps": opts.reps,
            "ref_logps": "precomputed",
            "date": time.strftime("%Y-%m-%d"),
            "results": results,
            "skipped": report["skipped"],
            "errors": report["errors"],
        }
        write_json(path, record)
        if results:
            shape = f"B={opts.B} T={opts.T} H={opts.H} V={opts.V} {opts.dtype}"
            plot(results, path.with_suffix(".png"), f"{record['machine']['device']} | {shape}")
        print(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if results else ""))
    bad = failures(report)
    for b in bad:
        print(f"FAILED {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
