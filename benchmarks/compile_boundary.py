"""Is the public API a ``torch.compile`` boundary worth having? Graph breaks, compile time, step time.

The function compiled: a tiny Llama-like body (embedding, two RMSNorm + SwiGLU MLP residual blocks, a
final RMSNorm) -> hidden [N, H] -> ``wrpo_kernels.fused_linear_wrpo_loss`` with the head weight -> loss;
each step is that compiled forward plus ``loss.backward()``. Two variants:

  boundary   ``fused_linear_wrpo_loss`` as shipped: dynamo stops at the call and runs it eagerly
             (``wrpo_kernels.api.compile_boundary``)
  traced     the undecorated function (``fused_linear_wrpo_loss.__wrapped__``): dynamo traces into the
             validation, the chunk schedule and the autograd function

each with the native CPU row kernels (``csrc/``) and with the pure-torch rows (``native.disabled()``),
under the inductor (default) and aot_eager backends. Every step sees one of ``--layouts`` batches with
the same token count and different sequence bounds, as packed training does.

Per configuration, in a fresh process (inductor's caches off): graph and graph-break counts
(``torch._dynamo.explain``; a break right before ``return`` leaves no second graph, so the
break events are counted too), the first step (compilation included), the first pass over all layouts
(recompilations included), frames compiled, and the steady-state step (median of ``--reps`` rounds over
the layouts, after that warm-up); eager steps for comparison; the largest relative difference of loss
and gradients from eager. Compile figures are medians over ``--procs`` processes.

    python benchmarks/compile_boundary.py --out benchmarks/results/compile_boundary_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from records import machine, write_json

VARIANTS = ("boundary", "traced")
ROWS = ("native", "torch")
BACKENDS = ("inductor", "aot_eager")
K = 3


class Body(torch.nn.Module):
    """Embedding -> ``layers`` x (RMSNorm, SwiGLU MLP, residual) -> RMSNorm; plus the head weight."""

    def __init__(self, V, H, F, layers, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(V, H)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(H) for _ in range(layers))
        self.gate = torch.nn.ModuleList(torch.nn.Linear(H, F, bias=False) for _ in range(layers))
        self.up = torch.nn.ModuleList(torch.nn.Linear(H, F, bias=False) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(F, H, bias=False) for _ in range(layers))
        self.final = torch.nn.RMSNorm(H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, gate, up, down in zip(self.norms, self.gate, self.up, self.down, strict=True):
            h = norm(x)
            x = x + down(torch.nn.functional.silu(gate(h)) * up(h))
        return self.final(x)


def layouts(n_layouts, B, mean_len, V, seed=0):
    """``n_layouts`` packed batches of B groups x K responses, all with N = B*K*mean_len tokens."""
    g = torch.Generator().manual_seed(seed)
    S = B * K
    N = S * mean_len
    out = []
    for _ in range(n_layouts):
        cuts = 2 * torch.sort(torch.randperm(N // 2 - 1, generator=g)[: S - 1] + 1).values  # >= 2 tokens
        cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([N])])
        ids = torch.randint(0, V, (N,), generator=g)
        labels = torch.randint(0, V, (N,), generator=g)
        for s in range(S):  # the first quarter of each response is "prompt": ignored
            a, b = int(cu[s]), int(cu[s + 1])
            labels[a : a + (b - a) // 4] = -100
            labels[b - 1] = -100  # shifted labels: the last position predicts nothing
        lengths = (cu[1:] - cu[:-1]).double().view(B, K)
        ref = -lengths * torch.log(torch.tensor(float(V))) + torch.randn(
            B, K, generator=g, dtype=torch.float64
        )
        out.append((ids, labels, cu, ref.float()))
    return out


def make_step_fn(model, fused):
    def loss_fn(ids, labels, cu, ref):
        hidden = model(ids)
        out = fused(hidden, model.head.weight, labels, cu, ref_logps=ref, backend="torch", beta=0.1)
        return out.loss

    return loss_fn


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def run_step(fn, model, batch):
    loss = fn(*batch)
    loss.backward()
    g = grads_of(model)
    for p in model.parameters():
        p.grad = None
    return loss.detach(), g


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def measure_one(args) -> dict:
    """One configuration, in this process (a fresh one: ``--one``)."""
    import wrpo_kernels as wk
    from wrpo_kernels import native

    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(8, torch._dynamo.config.cache_size_limit)
    model = Body(args.V, args.H, args.F, args.layers)
    batches = layouts(args.layouts, args.B, args.mean_len, args.V)
    fused = wk.fused_linear_wrpo_loss if args.variant == "boundary" else wk.fused_linear_wrpo_loss.__wrapped__
    fn = make_step_fn(model, fused)
    rows = native.disabled() if args.rows == "torch" else contextlib.nullcontext()
    if args.rows == "native" and not native.load():
        raise SystemExit("the native row kernels did not build here")
    with rows:
        eager = [run_step(fn, model, b) for b in batches]  # also warms the extension and allocator
        t_eager = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for b in batches:
                run_step(fn, model, b)
            t_eager.append((time.perf_counter() - t0) / len(batches))

        ex = torch._dynamo.explain(fn)(*batches[0])
        breaks = sorted({str(r.reason).splitlines()[0][:120] for r in ex.break_reasons})
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()

        compiled = torch.compile(fn, backend=args.backend)
        t0 = time.perf_counter()
        first = run_step(compiled, model, batches[0])
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = [first] + [run_step(compiled, model, b) for b in batches[1:]]
        t_warm = t_first + time.perf_counter() - t0
        frames = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        t_steady = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for b in batches:
                run_step(compiled, model, b)
            t_steady.append((time.perf_counter() - t0) / len(batches))
        frames_after = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    err_loss = max(rel(r[0], e[0]) for r, e in zip(results, eager, strict=True))
    err_grad = max(
        rel(a, b) for r, e in zip(results, eager, strict=True) for a, b in zip(r[1], e[1], strict=True)
    )
    return {
        "variant": args.variant,
        "rows": args.rows,
        "backend": args.backend,
        "graphs": ex.graph_count,
        "graph_breaks": ex.graph_break_count,
        "break_events": len(ex.break_reasons),
        "break_reasons": breaks,
        "first_step_s": t_first,
        "warmup_all_layouts_s": t_warm,
        "graphs_compiled_warmup": frames,
        "graphs_compiled_steady": frames_after - frames,
        "steady_step_ms": 1e3 * statistics.median(t_steady),
        "eager_step_ms": 1e3 * statistics.median(t_eager),
        "max_rel_err_loss": err_loss,
        "max_rel_err_grads": err_grad,
    }


def child(args, variant, rows, backend, cache_dir) -> dict:
    env = {
        **os.environ,
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
        "TORCHINDUCTOR_CACHE_DIR": cache_dir,
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    cmd = [sys.executable, __file__, "--one", "--variant", variant, "--rows", rows, "--backend", backend]
    for k in ("B", "mean_len", "H", "F", "V", "layers", "layouts", "reps", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{variant}/{rows}/{backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_record(runs: list[dict]) -> dict:
    rec = dict(runs[0])
    for k in ("first_step_s", "warmup_all_layouts_s", "steady_step_ms", "eager_step_ms"):
        rec[k] = statistics.median(r[k] for r in runs)
        rec[k + "_runs"] = [round(r[k], 4) for r in runs]
    for k in ("max_rel_err_loss", "max_rel_err_grads"):
        rec[k] = max(r[k] for r in runs)
    return rec


def summary(r: dict) -> str:
    return (
        f"{r['backend']:9s} {r['rows']:6s} {r['variant']:8s} graphs {r['graphs']:2d}, breaks "
        f"{r['graph_breaks']:2d} ({r['break_events']} events) | first step {r['first_step_s']:5.1f} s, "
        f"all layouts {r['warmup_all_layouts_s']:5.1f} s ({r['graphs_compiled_warmup']} graphs) | step "
        f"{r['steady_step_ms']:6.2f} ms (eager {r['eager_step_ms']:6.2f}) | rel err "
        f"{r['max_rel_err_loss']:.0e} / {r['max_rel_err_grads']:.0e}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", action="store_true", help="measure one configuration in this process (internal)")
    p.add_argument("--variant", choices=VARIANTS, default="boundary")
    p.add_argument("--rows", choices=ROWS, default="native")
    p.add_argument("--backend", choices=BACKENDS, default="inductor")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rows-list", default=",".join(ROWS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--B", type=int, default=2, help="groups of K=3 responses")
    p.add_argument("--mean-len", type=int, default=40, help="tokens per response (on average)")
    p.add_argument("--H", type=int, default=64)
    p.add_argument("--F", type=int, default=172)
    p.add_argument("--V", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--layouts", type=int, default=4, help="batches with different sequence bounds")
    p.add_argument("--reps", type=int, default=15, help="rounds over the layouts for the step times")
    p.add_argument("--procs", type=int, default=3, help="fresh processes per configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args)))
        return

    configs = [
        (backend, rows, variant)
        for backend in args.backends.split(",")
        for rows in args.rows_list.split(",")
        for variant in args.variants.split(",")
    ]
    runs = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.procs):  # configurations interleaved: a load spike hits them all alike
            for backend, rows, variant in configs:
                cache = str(Path(tmp) / f"{backend}-{rows}-{variant}-{i}")
                runs[backend, rows, variant].append(child(args, variant, rows, backend, cache))
                print(f"[{i + 1}/{args.procs}] {summary(runs[backend, rows, variant][-1])}", flush=True)
    results = [median_record(runs[c]) for c in configs]
    print("medians:")
    for rec in results:
        print(summary(rec))
    record = {
        "machine": machine("cpu"),
        "config": {
            k: getattr(args, k)
            for k in ("B", "mean_len", "H", "F", "V", "layers", "layouts", "reps", "procs", "threads")
        },
        "K": K,
        "results": results,
    }
    if args.out:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
