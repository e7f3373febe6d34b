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
import contextlib
import importlib
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from measure import MMAP_ENV, bar_plot, peak_rss_rise_mb, write_json
from measure import machine as describe_machine

import wrpo_kernels as wk
from wrpo_kernels import native, reference
from wrpo_kernels.api import triton_unavailable_reason
from wrpo_kernels.objective import make_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = (
    "naive-eager", "naive-compile", "wrpo-torch", "wrpo-torch-nocsrc", "wrpo-triton", "cce-logps",
    "trl-chunked", "naive-eager/k2", "wrpo-torch/k2", "wrpo-triton/k2", "liger-dpo/k2",
)  # fmt: skip
# Built (and warmed up, which compiles) in this order, so that under --time-budget ours come first and
# the slow-compiling peers are the ones left out (a build can take a minute: the cut-off leaves room).
BUILD_ORDER = (
    "wrpo-triton", "wrpo-torch", "gemm-only", "naive-eager", "wrpo-triton/k2", "wrpo-torch/k2",
    "naive-eager/k2", "wrpo-torch-nocsrc", "liger-dpo/k2", "cce-logps", "trl-chunked", "naive-compile",
)  # fmt: skip
GEMM = "gemm-only"  # a reference, not a loss: run only when named, never checked, no memory measured
EXTRA_METHODS = (GEMM,)
TWO_PASS = {"cce-logps", "trl-chunked"}  # backward recomputes the logits: 8NHV
# The package each peer needs: (module to import, how to get it)
PEERS = {
    "cce-logps": ("cut_cross_entropy", "cut-cross-entropy"),
    "trl-chunked": ("trl.kernels.chunked_logprob", "trl"),
    "liger-dpo/k2": ("liger_kernel.chunked_loss", "liger-kernel"),
}
# TRL's DPO trainer passes this vocabulary chunk to ChunkedLogProbFunction (trl.trainer.utils)
TRL_CHUNK_SIZE = 32768
CHECK_TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
# Dense bf16 tensor-core peak (TFLOP/s) by device tag; PCIe / NVL variants below
PEAK_BF16_TFLOPS = {
    "h100": 989.4, "h200": 989.4, "gh200": 989.4, "h800": 989.4, "h20": 148.0, "b200": 2250.0,
    "b100": 1750.0, "a100": 312.0, "a800": 312.0, "l40s": 362.0, "l4": 121.0,
}  # fmt: skip
PEAK_BF16_VARIANTS = {("h100", "pcie"): 756.5, ("h100", "nvl"): 835.0, ("h200", "nvl"): 835.0}


def device_tag(device: str) -> str:
    """A short name for file names: "cpu", or the GPU model, e.g. "h100" for "NVIDIA H100 80GB HBM3"."""
    if device != "cuda":
        return device
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name().lower())
    words = [w for w in words if w not in ("nvidia", "tesla", "geforce", "rtx", "quadro")]
    return next((w for w in words if re.search(r"\d", w) and not w.endswith("gb")), "cuda")


def peak_bf16_tflops(device: str) -> float | None:
    """Dense bf16 peak of the CUDA device from a table of known GPUs; None if unknown (or a CPU)."""
    if device != "cuda":
        return None
    tag, name = device_tag(device), torch.cuda.get_device_name().lower()
    for (model, variant), peak in PEAK_BF16_VARIANTS.items():
        if tag == model and variant in name:
            return peak
    return PEAK_BF16_TFLOPS.get(tag)


def unavailable(method: str, args) -> str | None:
    """Why ``method`` cannot run here (a missing package, the wrong device), or None if it can."""
    dev = torch.device(args.device)
    if method.startswith("wrpo-triton"):
        if reason := triton_unavailable_reason(dev):
            return reason
        if dev.type == "cpu" and args.dtype == "bf16":
            return "the Triton interpreter computes bf16 dots wrongly (CPU)"
    if method == "cce-logps" and dev.type != "cuda":
        return "cut-cross-entropy runs on CUDA only"
    if method in PEERS:
        module, package = PEERS[method]
        try:
            importlib.import_module(module)
        except Exception as err:  # not installed, or an install that does not import: skip the peer
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return f"{package} is not importable ({type(err).__name__}: {first})"
    return None


def make_inputs(args, K):
    """Packed groups of K responses of T tokens each, random hidden states and head."""
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    # drawn on the GPU there (a CPU draw of a 128k x 4k head takes seconds), on the CPU elsewhere
    home = dev if dev.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=home).manual_seed(0)
    N = args.B * K * args.T
    hidden = torch.randn(N, args.H, generator=g, device=home).to(dev, dt).requires_grad_()
    weight = (
        (torch.randn(args.V, args.H, generator=g, device=home) * args.H**-0.5).to(dev, dt).requires_grad_()
    )
    labels = torch.randint(0, args.V, (N,), generator=g, device=home).to(dev)
    labels[args.T - 1 :: args.T] = -100  # shifted labels: the last position of a sequence predicts nothing
    cu = torch.arange(0, N + 1, args.T, device=dev)
    ref = (torch.randn(args.B, K, generator=g, device=home) - 10.0 * args.T).to(dev)
    return hidden, weight, labels, cu, ref


def shape_of(method, args=None):
    """(K, num_chosen, reference log-probs used?) of ``method``: K = 2 for the /k2 methods, else
    ``args.K`` (default 3) with ``args.num_chosen`` chosen (default K - 1)."""
    if method.endswith("/k2"):
        return 2, 1, method != "liger-dpo/k2"
    K = getattr(args, "K", None) or 3
    C = getattr(args, "num_chosen", None) or K - 1
    return K, C, True


_COMPILED: dict = {}


def naive_compiled(K, C, backend):
    """The naive path under torch.compile, one compiled function per (K, backend), tensors as arguments
    (so that fresh inputs of the same shape reuse the compiled code)."""
    key = (K, C, backend)
    if key not in _COMPILED:
        spec = make_spec(
            responses_per_prompt=K, num_chosen=C, alpha=0.1, chosen_weights=None,
            loss_type="dpo", beta=0.1, gamma=0.0, label_smoothing=0.0,
        )  # fmt: skip

        def loss(h, w, labels, cu, ref):
            return reference.fused_linear_wrpo_loss(spec, h, w, labels, cu, ref).loss

        _COMPILED[key] = torch.compile(loss, backend=backend)
    return _COMPILED[key]


def sequence_ids(S, T, device):
    return torch.repeat_interleave(torch.arange(S, device=device), T)


class Built(NamedTuple):
    step: Callable  # one fwd+bwd; returns the loss
    grads: Callable  # (dL/dhidden [N, H] in the packed order, dL/dweight) of the last step
    clear: Callable  # drops the gradients


def build(method, args, inputs=None) -> Built:
    """One method, ready to run on ``inputs`` (those of make_inputs; default: fresh ones)."""
    K, C, _ = shape_of(method, args)
    hidden, weight, labels, cu, ref = inputs if inputs is not None else make_inputs(args, K)
    opts = dict(responses_per_prompt=K, num_chosen=C, alpha=0.1, ref_logps=ref, beta=0.1)
    dX = None  # how to read dL/dhidden back in the packed order, when it is not hidden.grad
    if method.startswith("naive-eager"):

        def loss_fn():
            return wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, backend="reference", **opts).loss

    elif method == "naive-compile":
        compiled = naive_compiled(K, C, args.compile_backend)

        def loss_fn():
            return compiled(hidden, weight, labels, cu, ref)

    elif method.startswith(("wrpo-torch", "wrpo-triton")):
        name = method.split("/")[0]
        backend = "triton" if name == "wrpo-triton" else "torch"
        row_ops = native.disabled if name.endswith("-nocsrc") else contextlib.nullcontext

        def loss_fn():
            with row_ops():
                return wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, backend=backend, **opts).loss

    elif method == "cce-logps":
        from cut_cross_entropy import linear_cross_entropy

        seq = sequence_ids(args.B * K, args.T, hidden.device)

        def loss_fn():
            nll = linear_cross_entropy(hidden, weight, labels, reduction="none")
            logps = (
                torch.zeros(args.B * K, device=hidden.device).index_add(0, seq, -nll.float()).view(args.B, K)
            )
            return wk.wrpo_loss(logps, ref, None, num_chosen=C, alpha=0.1, beta=0.1)[0]

    elif method == "trl-chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        # as TRL's fused head does on Triton devices: only the labelled rows reach the head
        keep = labels != -100
        seq = sequence_ids(args.B * K, args.T, hidden.device)[keep]
        targets = labels[keep]

        def loss_fn():
            per_token = ChunkedLogProbFunction.apply(
                hidden[keep], weight, None, targets, 1.0, TRL_CHUNK_SIZE, None, 1.0, ("log_probs",)
            )[0]
            logps = (
                torch.zeros(args.B * K, device=hidden.device)
                .index_add(0, seq, per_token.float())
                .view(args.B, K)
            )
            return wk.wrpo_loss(logps, ref, None, num_chosen=C, alpha=0.1, beta=0.1)[0]

    elif method == "liger-dpo/k2":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger wants [2B, T, H]: all chosen rows first, then all rejected rows.
        order = torch.cat([torch.arange(0, 2 * args.B, 2), torch.arange(1, 2 * args.B, 2)])
        back = torch.argsort(order)
        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=args.device == "cuda")
        targets = labels.view(2 * args.B, args.T)[order]
        h3 = hidden.detach().view(2 * args.B, args.T, args.H)[order].requires_grad_()
        hidden = h3

        def loss_fn():
            out = liger(weight, h3, targets)
            return out[0] if isinstance(out, tuple) else out

        def dX():
            return h3.grad[back].reshape(-1, args.H)

    elif method == GEMM:
        return gemm_only(hidden, weight, args.gemm_rows)

    else:
        raise ValueError(method)

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def grads():
        return (dX() if dX else hidden.grad), weight.grad

    def clear():
        hidden.grad = weight.grad = None

    return Built(step, grads, clear)


def gemm_only(hidden, weight, rows=None) -> Built:
    """The three GEMMs of the head's fwd+bwd alone, into preallocated buffers: per chunk of ``rows``
    rows (default all) logits = X W^T, dX = G W, dW += G^T X, with G the logits buffer itself."""
    X, W = hidden.detach(), weight.detach()
    N = X.shape[0]
    rows = min(rows or N, N)
    logits = torch.empty(rows, W.shape[0], dtype=X.dtype, device=X.device)
    dX, dW = torch.empty_like(X), torch.zeros_like(W)
    bounds = [(a, min(a + rows, N)) for a in range(0, N, rows)]

    def step():
        dW.zero_()
        for a, b in bounds:
            G = logits[: b - a]
            torch.mm(X[a:b], W.t(), out=G)
            torch.mm(G, W, out=dX[a:b])
            dW.addmm_(G.t(), X[a:b])
        return None

    return Built(step, lambda: (dX, dW), lambda: None)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(method, args, built=None) -> float:
    """Peak memory of one fwd+bwd above what the inputs already hold (see module docstring).
    ``built``: the method already built and warmed up on its inputs (default: built here)."""
    if built is None:
        built = build(method, args)
        if method == "naive-compile" or args.device == "cuda":
            built.step()  # compile / lazy init outside the measurement
    built.clear()  # the warm-up's gradients are no part of the base: the measured step makes its own
    step = built.step
    if args.device == "cpu" and method.startswith("wrpo-torch"):
        native.row_kernels_enabled(torch.device("cpu"))  # load the native library outside the measurement
    if method == "trl-chunked":
        importlib.import_module("trl.trainer.utils")  # its backward imports this on first use
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_rss_rise_mb(step)


def measure_memory_in_child(method, args) -> float:
    env = {**os.environ, **MMAP_ENV}
    shape = ["--device", args.device, "--B", args.B, "--T", args.T, "--H", args.H, "--V", args.V,
             "--dtype", args.dtype, "--compile-backend", args.compile_backend, "--K", args.K,
             "--num-chosen", shape_of("", args)[1]]  # fmt: skip
    cmd = [sys.executable, __file__, "--memory-child", method, *map(str, shape)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def machine(device) -> dict:
    info = describe_machine(device)
    if device == "cpu":
        info["native_row_kernels"] = native.row_kernels_enabled(torch.device("cpu"))
    else:
        info["cuda"] = torch.version.cuda
        info["peak_bf16_tflops"] = peak_bf16_tflops(device)
    with contextlib.suppress(Exception):
        import triton

        info["triton"] = triton.__version__
    return info


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in the expected tensor's dtype (fp32 or fp64)."""
    if actual is None:
        return float("inf")
    e = expected.detach()
    a = actual.detach().to(e.dtype)
    diff, scale = (a - e).norm().item(), e.norm().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def check_reference(args, inputs, with_ref, num_chosen) -> dict:
    """Loss and gradients on the same (rounded) inputs: fp64 naive if small, else fp32 torch backend."""
    hidden, weight, labels, cu, ref = inputs
    K = ref.shape[1]
    small = hidden.shape[0] * weight.shape[0] <= 2**24
    dtype, backend = (torch.float64, "reference") if small else (torch.float32, "torch")
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    ref_logps = ref if with_ref else torch.zeros_like(ref)
    out = wk.fused_linear_wrpo_loss(
        h, w, labels, cu, responses_per_prompt=K, num_chosen=num_chosen, alpha=0.1,
        ref_logps=ref_logps, beta=0.1, backend=backend,
    )  # fmt: skip
    out.loss.backward()
    name = (
        f"{'fp64 naive' if small else 'fp32 torch backend'}{'' if with_ref else ', no reference log-probs'}"
    )
    return {"loss": out.loss.detach(), "dX": h.grad, "dW": w.grad, "name": name}


def check_errors(loss, grads, expect) -> dict:
    dX, dW = grads
    return {
        "loss": rel_err(loss, expect["loss"]),
        "dX": rel_err(dX, expect["dX"]),
        "dW": rel_err(dW, expect["dW"]),
    }


def time_methods(methods, args, log=print):
    """Build, warm up and check every method, then time them interleaved.

    On CUDA (or with --memory-inproc) each method's peak memory is measured here too, on its inputs.
    -> (times {method: [s]}, mem {method: MiB}, checks {method: errors}, errors {method: message},
    skipped {method: reason})."""
    inputs, refs, steps, mem, checks, errors, skipped = {}, {}, {}, {}, {}, {}, {}
    t0 = time.perf_counter()
    for m in sorted(methods, key=lambda m: BUILD_ORDER.index(m) if m in BUILD_ORDER else len(BUILD_ORDER)):
        if args.time_budget and time.perf_counter() - t0 > 0.45 * args.time_budget:
            skipped[m] = f"time budget: {args.time_budget:.0f} s (building the others took 45% of it)"
            log(f"skip {m}: {skipped[m]}")
            continue
        K, C, with_ref = shape_of(m, args)
        try:
            if K not in inputs:
                inputs[K] = make_inputs(args, K)
            built = build(m, args, inputs[K])
            for _ in range(max(args.warmup, 1)):
                loss = built.step()
            if not args.no_check and m != GEMM:
                key = (K, with_ref)
                if key not in refs:
                    refs[key] = check_reference(args, inputs[K], with_ref, C)
                checks[m] = {**check_errors(loss, built.grads(), refs[key]), "reference": refs[key]["name"]}
            if m == GEMM:
                mem[m] = None
            elif args.device == "cuda" or args.memory_inproc:
                mem[m] = peak_memory_mb(m, args, built)
            built.clear()
            steps[m] = built.step
        except Exception as err:  # record it, go on with the others
            errors[m] = f"{type(err).__name__}: {str(err).strip()[:500]}"
            log(f"error in {m}: {errors[m]}")
            if args.device == "cuda":
                torch.cuda.empty_cache()
    refs.clear()
    ran = [m for m in methods if m in steps]
    times = {m: [] for m in ran}
    for r in range(args.reps):
        # round-robin, so that drifts of the machine hit every method alike, starting one method later
        # each round: on the CPU host, a step that frees GiBs (naive) slows whatever runs next for ~1 s
        for m in ran[r % max(len(ran), 1) :] + ran[: r % max(len(ran), 1)]:
            if m not in times:
                continue
            try:
                sync(args.device)
                t = time.perf_counter()
                steps[m]()
                sync(args.device)
                times[m].append(time.perf_counter() - t)
            except Exception as err:
                errors[m] = f"{type(err).__name__}: {str(err).strip()[:500]}"
                log(f"error in {m}: {errors[m]}")
                del times[m]
    steps.clear()
    inputs.clear()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return times, mem, checks, errors, skipped


def grade_checks(results, args) -> None:
    """Mark each result's check ok if every error is within the dtype's tolerance or twice naive's."""
    tol = CHECK_TOL[args.dtype]
    by = {r["method"]: r for r in results}
    for r in results:
        c = r.get("check")
        if not c:
            continue
        own_bar = r["method"] in ("liger-dpo/k2", r["baseline"])  # another loss, or naive itself
        naive = None if own_bar else by.get(r["baseline"], {}).get("check")
        bars = {k: max(tol, 2 * naive[k]) if naive else tol for k in ("loss", "dX", "dW")}
        c["tolerance"] = bars
        c["ok"] = all(c[k] <= bars[k] for k in bars)


def plot(results, path, title):
    panels = [("median_ms", "fwd+bwd median (ms)"), ("peak_mem_mb", "peak memory (MiB)")]
    rows = [{**r, "peak_mem_mb": r["peak_mem_mb"] or 0} for r in results]  # gemm-only: not measured
    bar_plot(rows, path, title, panels, highlight=lambda m: m.startswith("wrpo"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=4, help="prompts")
    p.add_argument("--T", type=int, default=512, help="tokens per response")
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--K", type=int, default=3, help="responses per prompt of the methods without /k2")
    p.add_argument("--num-chosen", type=int, default=None, help="chosen of those K (default K - 1)")
    p.add_argument("--gemm-rows", type=int, default=None, help="gemm-only: rows per GEMM chunk (default all)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", default=None, help="comma-separated; default: all that run on the device")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of naive-compile")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known GPUs)")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds; methods not built by 45%% of it are skipped"
    )
    p.add_argument("--no-check", action="store_true", help="skip the loss/gradient check")
    p.add_argument(
        "--memory-inproc", action="store_true",
        help="CPU: measure peak RSS in this process (quick, less exact) instead of a fresh one per method",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None,
        help="JSON path, {device} is filled in (cpu, h100, ...; a .png plot is written beside it)",
    )  # fmt: skip
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    explicit = args.methods is not None
    args.methods = [m for m in args.methods.split(",") if m] if explicit else list(METHODS)
    unknown = set(args.methods) - set(METHODS) - set(EXTRA_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS + EXTRA_METHODS)}")
    if args.K < 2 or not 1 <= (args.num_chosen or args.K - 1) < args.K:
        p.error(f"--K {args.K} --num-chosen {args.num_chosen}: need K >= 2 and 1 <= num_chosen < K")
    if args.device == "cuda" and not explicit:
        args.methods.remove("wrpo-torch-nocsrc")  # the csrc row kernels are CPU-only: it is wrpo-torch
    args.skipped = {}
    if not args.memory_child:
        for m in list(args.methods):
            if reason := unavailable(m, args):
                args.skipped[m] = reason
                args.methods.remove(m)
    return args


def run(args, log=print) -> dict:
    """Time (interleaved), check and measure memory of ``args.methods``.

    -> {"results": one dict per measured method, "skipped": {method: why}, "errors": {method: what}}."""
    for m, reason in args.skipped.items():
        log(f"skip {m}: {reason}")
    times, mem, checks, errors, skipped = time_methods(args.methods, args, log)
    skipped = {**args.skipped, **skipped}
    for m in times:
        if m in mem:
            continue
        try:
            mem[m] = measure_memory_in_child(m, args)
        except Exception as err:
            errors[m] = f"memory: {type(err).__name__}: {str(err).strip()[:500]}"
            log(f"error in {m}: {errors[m]}")
    results = []
    elem = DTYPES[args.dtype].itemsize
    peak = args.peak_tflops or peak_bf16_tflops(args.device)
    for m in args.methods:
        if m not in times or m not in mem or not times[m]:
            continue
        K, C, _ = shape_of(m, args)
        N = args.B * K * args.T
        median_s = statistics.median(times[m])
        grads_mb = (N + args.V) * args.H * elem / 2**20  # dX and dW in the working dtype
        flops6 = 6 * N * args.H * args.V
        results.append(
            {
                "method": m,
                "K": K,
                "num_chosen": C,
                "tokens": N,
                "times_s": times[m],
                "median_ms": 1e3 * median_s,
                "tflops": (8 if m in TWO_PASS else 6) * N * args.H * args.V / median_s / 1e12,
                "pct_peak_6nhv": 100 * flops6 / median_s / 1e12 / peak if peak else None,
                "peak_mem_mb": mem[m],
                "extra_mem_mb": mem[m] - grads_mb if mem[m] is not None else None,
                "baseline": baseline_of(m, args),
                "check": checks.get(m),
            }
        )
    grade_checks(results, args)
    by = {r["method"]: r for r in results}
    for r in results:
        b = by.get(r["baseline"])
        r["speedup_vs_naive"] = b["median_ms"] / r["median_ms"] if b else None
        r["mem_vs_naive"] = (
            r["peak_mem_mb"] / b["peak_mem_mb"]
            if b and r["peak_mem_mb"] is not None and b["peak_mem_mb"] > 0
            else None
        )
        c = by.get("naive-compile") if r["K"] == shape_of("", args)[0] else None
        r["speedup_vs_compile"] = c["median_ms"] / r["median_ms"] if c else None
        lg = by.get("liger-dpo/k2") if r["K"] == 2 else None
        r["speedup_vs_liger"] = lg["median_ms"] / r["median_ms"] if lg else None
        twin = by.get(r["method"] + "-nocsrc")
        if twin:  # the csrc row kernels against the pure-torch rows, round by round
            ratios = sorted(u / t for t, u in zip(r["times_s"], twin["times_s"], strict=True))
            r["paired_speedup_vs_nocsrc"] = {
                "median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
            }  # fmt: skip
    return {"results": results, "skipped": skipped, "errors": errors}


def baseline_of(method, args) -> str:
    """The naive method on the same tokens: naive-eager/k2 for the /k2 methods (naive-eager when
    --K 2 and naive-eager/k2 is not run), naive-eager for the others."""
    if method.endswith("/k2") and (args.K != 2 or "naive-eager/k2" in args.methods):
        return "naive-eager/k2"
    return "naive-eager"


def failures(report) -> list[str]:
    """Our methods (wrpo-*) that failed to run or failed the check: what makes the run fail."""
    bad = [f"{m}: {e}" for m, e in report["errors"].items() if m.startswith("wrpo-")]
    for r in report["results"]:
        if r["method"].startswith("wrpo-") and r.get("check") and not r["check"]["ok"]:
            bad.append(f"{r['method']}: check failed {fmt_check(r['check'])}")
    return bad


def fmt_check(c) -> str:
    if not c:
        return "-"
    return f"loss {c['loss']:.1e} dX {c['dX']:.1e} dW {c['dW']:.1e}"


def shape_dict(args) -> dict:
    K, C, _ = shape_of("", args)
    k = f"{K} (2 for /k2)" if K == 3 and C == 2 else f"{K}, {C} chosen (2, 1 chosen for /k2)"
    return {"B": args.B, "K": k, "T": args.T, "H": args.H, "V": args.V}


def print_table(results, args, report=None):
    shape = shape_dict(args)
    info = machine(args.device)
    native_note = (
        f"; native row kernels: {info['native_row_kernels']}" if "native_row_kernels" in info else ""
    )
    print(f"device: {info['device']}{native_note}; shape {shape}; dtype {args.dtype}; median of {args.reps}")
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
        p = r.get("paired_speedup_vs_nocsrc")
        if p:
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


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        print(peak_memory_mb(args.memory_child, args))
        return 0
    report = run(args)
    results = report["results"]
    print_table(results, args, report)
    if args.out:
        out = Path(args.out.format(device=device_tag(args.device)))
        shape = shape_dict(args)
        record = {
            "machine": machine(args.device), "shape": shape, "dtype": args.dtype, "reps": args.reps,
            "ref_logps": "precomputed", "date": time.strftime("%Y-%m-%d"), "results": results,
            "skipped": report["skipped"], "errors": report["errors"],
        }  # fmt: skip
        write_json(out, record)
        title = f"{record['machine']['device']} | B={args.B} T={args.T} H={args.H} V={args.V} {args.dtype}"
        if results:
            plot(results, out.with_suffix(".png"), title)
        print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if results else ""))
    bad = failures(report)
    for b in bad:
        print(f"FAILED {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
