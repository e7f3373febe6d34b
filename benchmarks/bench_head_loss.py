"""Fused LM head + preference loss: fwd+bwd time and peak memory of every backend and its peers.

Methods (same tokens, same dtype, precomputed reference log-probs):
  naive-eager      wrpo_kernels.reference: full [N, V] logits, log_softmax, gather (K responses)
  naive-compile    the same under torch.compile
  wrpo-torch       wrpo_kernels backend="torch" (chunked single pass; on CPU its row work runs in the
                   native kernels of csrc/ when they build, see wrpo_kernels.native)
  wrpo-torch-nocsrc  the same with the pure-torch row ops (wrpo_kernels.native.disabled())
  wrpo-triton      wrpo_kernels backend="triton" (CUDA only)
  cce-logps        cut-cross-entropy per-token log-probs (reduction="none"), summed per sequence,
                   then wrpo_kernels.wrpo_loss (CUDA only; a peer for the log-prob part)
  and, on K = 2 (chosen = the target pick, rejected) since Liger takes pairs only:
  naive-eager/k2, wrpo-torch/k2, wrpo-triton/k2, liger-dpo/k2 (LigerFusedLinearDPOLoss, use_ref_model=False)

TFLOP/s is the model's work over the time: 6NHV for every method but cce-logps (8NHV: its
backward recomputes the logits).

Time: median of --reps fwd+bwd calls after a warm-up, methods interleaved round-robin in one process,
the order rotated every round (use a multiple of the number of methods). ``paired_speedup_vs_nocsrc`` of
wrpo-torch is the median over rounds of (wrpo-torch-nocsrc time / wrpo-torch time), when both run.
Memory: CUDA: max allocated above the inputs; CPU: peak RSS rise over one fwd+bwd in a fresh process
(VmHWM reset through /proc/self/clear_refs, large allocations forced to mmap so frees are returned).

    python benchmarks/bench_head_loss.py                     # the CPU acceptance shape
    python benchmarks/bench_head_loss.py --device cuda --H 4096 --V 128256 --T 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import MMAP_ENV, bar_plot, peak_rss_rise_mb, write_json
from measure import machine as describe_machine

import wrpo_kernels as wk
from wrpo_kernels import native, reference
from wrpo_kernels.objective import make_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = (
    "naive-eager", "naive-compile", "wrpo-torch", "wrpo-torch-nocsrc", "wrpo-triton", "cce-logps",
    "naive-eager/k2", "wrpo-torch/k2", "wrpo-triton/k2", "liger-dpo/k2",
)  # fmt: skip
CUDA_ONLY = {"wrpo-triton", "wrpo-triton/k2", "cce-logps"}


def make_inputs(args, K):
    """Packed groups of K responses of T tokens each, random hidden states and head."""
    g = torch.Generator().manual_seed(0)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    N = args.B * K * args.T
    hidden = torch.randn(N, args.H, generator=g).to(dev, dt).requires_grad_()
    weight = (torch.randn(args.V, args.H, generator=g) * args.H**-0.5).to(dev, dt).requires_grad_()
    labels = torch.randint(0, args.V, (N,), generator=g).to(dev)
    labels[:: args.T] = -100  # the first position of every response is a prompt token
    cu = torch.arange(0, N + 1, args.T, device=dev)
    ref = (torch.randn(args.B, K, generator=g) - 10.0 * args.T).to(dev)
    return hidden, weight, labels, cu, ref


def build(method, args):
    """-> (step, inputs): step() runs one fwd+bwd and returns the loss."""
    K = 2 if method.endswith("/k2") else 3
    C = 1 if K == 2 else 2
    hidden, weight, labels, cu, ref = make_inputs(args, K)
    opts = dict(responses_per_prompt=K, num_chosen=C, alpha=0.1, ref_logps=ref, beta=0.1)
    if method.startswith("naive-eager"):

        def loss_fn():
            return wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, backend="reference", **opts).loss

    elif method == "naive-compile":
        spec = make_spec(
            responses_per_prompt=K, num_chosen=C, alpha=0.1, chosen_weights=None,
            loss_type="dpo", beta=0.1, gamma=0.0, label_smoothing=0.0,
        )  # fmt: skip
        compiled = torch.compile(
            lambda h, w: reference.fused_linear_wrpo_loss(spec, h, w, labels, cu, ref).loss
        )

        def loss_fn():
            return compiled(hidden, weight)

    elif method.startswith(("wrpo-torch", "wrpo-triton")):
        name = method.split("/")[0]
        backend = "triton" if name == "wrpo-triton" else "torch"
        row_ops = native.disabled if name.endswith("-nocsrc") else contextlib.nullcontext

        def loss_fn():
            with row_ops():
                return wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, backend=backend, **opts).loss

    elif method == "cce-logps":
        from cut_cross_entropy import linear_cross_entropy

        seq = torch.repeat_interleave(torch.arange(args.B * K, device=hidden.device), args.T)

        def loss_fn():
            nll = linear_cross_entropy(hidden, weight, labels, reduction="none")
            logps = (
                torch.zeros(args.B * K, device=hidden.device).index_add(0, seq, -nll.float()).view(args.B, K)
            )
            return wk.wrpo_loss(logps, ref, None, num_chosen=C, alpha=0.1, beta=0.1)[0]

    elif method == "liger-dpo/k2":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger wants [2B, T, H]: all chosen rows first, then all rejected rows.
        order = torch.cat([torch.arange(0, 2 * args.B, 2), torch.arange(1, 2 * args.B, 2)])
        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=args.device == "cuda")
        targets = labels.view(2 * args.B, args.T)[order]
        h3 = hidden.detach().view(2 * args.B, args.T, args.H)[order].requires_grad_()
        hidden = h3

        def loss_fn():
            out = liger(weight, h3, targets)
            return out[0] if isinstance(out, tuple) else out

    else:
        raise ValueError(method)

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step, (hidden, weight)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(method, args) -> float:
    """Peak memory of one fwd+bwd above what the inputs already hold (see module docstring)."""
    step, _ = build(method, args)
    if method == "naive-compile" or args.device == "cuda":
        step()  # compile / lazy init outside the measurement
    if args.device == "cpu" and method.startswith("wrpo-torch"):
        native.row_kernels_enabled(torch.device("cpu"))  # load the native library outside the measurement
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_rss_rise_mb(step)


def measure_memory_in_child(method, args) -> float:
    if args.device == "cuda":
        return peak_memory_mb(method, args)
    env = {**os.environ, **MMAP_ENV}
    shape = [
        "--device",
        args.device,
        "--B",
        args.B,
        "--T",
        args.T,
        "--H",
        args.H,
        "--V",
        args.V,
        "--dtype",
        args.dtype,
    ]
    cmd = [sys.executable, __file__, "--memory-child", method, *map(str, shape)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def machine(device) -> dict:
    info = describe_machine(device)
    if device == "cpu":
        info["native_row_kernels"] = native.row_kernels_enabled(torch.device("cpu"))
    return info


def time_methods(methods, args) -> dict:
    steps = {}
    for m in methods:
        steps[m], _ = build(m, args)
        for _ in range(args.warmup):
            steps[m]()
    times = {m: [] for m in methods}
    for r in range(args.reps):
        # round-robin, so that drifts of the machine hit every method alike, starting one method later
        # each round: on the CPU host, a step that frees GiBs (naive) slows whatever runs next for ~1 s
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            sync(args.device)
            t = time.perf_counter()
            steps[m]()
            sync(args.device)
            times[m].append(time.perf_counter() - t)
    return times


def plot(results, path, title):
    panels = [("median_ms", "fwd+bwd median (ms)"), ("peak_mem_mb", "peak memory (MiB)")]
    bar_plot(results, path, title, panels, highlight=lambda m: m.startswith("wrpo"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=4, help="prompts")
    p.add_argument("--T", type=int, default=512, help="tokens per response")
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", default=None, help="comma-separated; default: all that run on the device")
    p.add_argument(
        "--out", default=None, help="JSON path, {device} is filled in (a .png plot is written beside it)"
    )
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in METHODS if args.device == "cuda" or m not in CUDA_ONLY]
    else:
        args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    return args


def run(args) -> list[dict]:
    """Time (interleaved) and measure memory of ``args.methods``; one result dict per method."""
    times = time_methods(args.methods, args)
    mem = {m: measure_memory_in_child(m, args) for m in args.methods}
    results = []
    elem = DTYPES[args.dtype].itemsize
    for m in args.methods:
        K = 2 if m.endswith("/k2") else 3
        N = args.B * K * args.T
        median_s = statistics.median(times[m])
        grads_mb = (N + args.V) * args.H * elem / 2**20  # dX and dW in the working dtype
        results.append(
            {
                "method": m,
                "K": K,
                "tokens": N,
                "times_s": times[m],
                "median_ms": 1e3 * median_s,
                "tflops": (8 if m == "cce-logps" else 6) * N * args.H * args.V / median_s / 1e12,
                "peak_mem_mb": mem[m],
                "extra_mem_mb": mem[m] - grads_mb,
                "baseline": "naive-eager/k2" if K == 2 else "naive-eager",
            }
        )
    by = {r["method"]: r for r in results}
    for r in results:
        b = by.get(r["baseline"])
        r["speedup_vs_naive"] = b["median_ms"] / r["median_ms"] if b else None
        r["mem_vs_naive"] = r["peak_mem_mb"] / b["peak_mem_mb"] if b else None
        twin = by.get(r["method"] + "-nocsrc")
        if twin:  # the csrc row kernels against the pure-torch rows, round by round
            ratios = sorted(u / t for t, u in zip(r["times_s"], twin["times_s"], strict=True))
            r["paired_speedup_vs_nocsrc"] = {
                "median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
            }  # fmt: skip
    return results


def print_table(results, args):
    shape = {"B": args.B, "K": "3 (2 for /k2)", "T": args.T, "H": args.H, "V": args.V}
    info = machine(args.device)
    native_note = (
        f"; native row kernels: {info['native_row_kernels']}" if "native_row_kernels" in info else ""
    )
    print(f"device: {info['device']}{native_note}; shape {shape}; dtype {args.dtype}; median of {args.reps}")
    print(
        f"{'method':<19}{'tokens':>8}{'median ms':>12}{'TFLOP/s':>9}{'peak MiB':>10}{'extra MiB':>10}"
        f"{'speed-up':>10}{'mem ratio':>11}"
    )
    for r in results:
        su = f"{r['speedup_vs_naive']:.2f}x" if r["speedup_vs_naive"] else "-"
        mr = f"{r['mem_vs_naive']:.3f}" if r["mem_vs_naive"] else "-"
        print(
            f"{r['method']:<19}{r['tokens']:>8}{r['median_ms']:>12.0f}{r['tflops']:>9.2f}{r['peak_mem_mb']:>10.0f}"
            f"{r['extra_mem_mb']:>10.0f}{su:>10}{mr:>11}"
        )
    for r in results:
        p = r.get("paired_speedup_vs_nocsrc")
        if p:
            print(
                f"{r['method']} vs {r['method']}-nocsrc, median of per-round ratios: {p['median']:.2f}x "
                f"(rounds {p['min']:.2f}x to {p['max']:.2f}x)"
            )


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        print(peak_memory_mb(args.memory_child, args))
        return
    results = run(args)
    print_table(results, args)
    if args.out:
        out = Path(args.out.format(device=args.device))
        shape = {"B": args.B, "K": "3 (2 for /k2)", "T": args.T, "H": args.H, "V": args.V}
        record = {
            "machine": machine(args.device), "shape": shape, "dtype": args.dtype, "reps": args.reps,
            "ref_logps": "precomputed", "date": time.strftime("%Y-%m-%d"), "results": results,
        }  # fmt: skip
        write_json(out, record)
        title = f"{record['machine']['device']} | B={args.B} T={args.T} H={args.H} V={args.V} {args.dtype}"
        plot(results, out.with_suffix(".png"), title)
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
