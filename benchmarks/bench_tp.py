"""A vocabulary-parallel head (tensor parallel, 2 processes each holding half the vocabulary) against one
process on the same CPU: ``wrpo_kernels.fused_linear_wrpo_loss`` forward + backward, same inputs.

Methods (each in fresh processes; gloo between the two TP ranks):
  1 process x 2 threads   the whole [V, H] head, torch.set_num_threads(2)
  1 process x 1 thread    the whole head on one core
  TP 2 x 1 thread         2 processes, each its [V/2, H] rows (a DTensor placed Shard(0)), 1 thread each

Inputs: N rows of B groups of K = 2 responses (every sequence's last row ignored), H, V, fp32, the torch
backend with its default chunk size (the same for every method: it follows the global V). Time: median
of --reps calls after a warm-up; a TP call is timed on rank 0 between two barriers, so it includes the
slower rank; ``collectives_ms`` is rank 0's time inside all_reduce / all_gather (waiting included).
Memory: each process's peak RSS rise over one call. Check: the TP loss, dX and dW against the first
method's.

    python benchmarks/bench_tp.py --out benchmarks/results/tp_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port, peak_rss_rise_mb  # noqa: E402
from plots import bar_plot  # noqa: E402
from records import machine, write_json  # noqa: E402

# name -> (processes, threads per process)
METHODS = {"1 process x 2 threads": (1, 2), "1 process x 1 thread": (1, 1), "TP 2 x 1 thread": (2, 1)}
PAIRS = {"responses_per_prompt": 2, "num_chosen": 1}  # K = 2: one chosen, one rejected


def inputs(args):
    """hidden [N, H], weight [V, H], labels [N], cu_seqlens [S+1], ref_logps [B, 2] (fp32)."""
    g = torch.Generator().manual_seed(0)
    S = 2 * args.B
    T = args.N // S
    hidden = torch.randn(S * T, args.H, generator=g)
    weight = torch.randn(args.V, args.H, generator=g) * args.H**-0.5
    labels = torch.randint(0, args.V, (S, T), generator=g)
    labels[:, -1] = -100
    ref = torch.randn(args.B, 2, generator=g) - T * 10.0
    return hidden, weight, labels.reshape(-1), torch.arange(0, S * T + 1, T), ref


class CollectiveTimer:
    """Time spent in torch.distributed.all_reduce / all_gather (what the head's collectives call)."""

    def __init__(self):
        import torch.distributed as dist

        self.seconds = 0.0
        for name in ("all_reduce", "all_gather"):
            real = getattr(dist, name)

            def timed(*a, _real=real, **kw):
                t = time.perf_counter()
                try:
                    return _real(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t

            setattr(dist, name, timed)


def rank_main(rank: int, world: int, threads: int, port: int, argv: list, out_dir: str) -> None:
    import torch.distributed as dist

    import wrpo_kernels as wk

    args = parse_args(argv)
    torch.set_num_threads(threads)
    hidden, weight, labels, cu, ref = inputs(args)
    timer = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        address = f"tcp://127.0.0.1:{port}"
        dist.init_process_group(
            "gloo", init_method=address, rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
        mesh = init_device_mesh("cpu", (world,))
        weight = distribute_tensor(weight, mesh, [Shard(0)])
        timer = CollectiveTimer()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def call():
        hidden.grad = weight.grad = None
        out = wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, ref_logps=ref, backend="torch", **PAIRS)
        out.loss.backward()
        return out.loss.detach()

    def sync():
        if world > 1:
            dist.barrier()

    try:
        call()  # warm-up
        times, collective = [], []
        for _ in range(args.reps):
            sync()
            before = timer.seconds if timer else 0.0
            t = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t)
            collective.append((timer.seconds - before) if timer else 0.0)
        mem = peak_rss_rise_mb(call)
        loss = call()
        dW = weight.grad.full_tensor() if world > 1 else weight.grad
        if rank == 0:
            torch.save({"loss": loss, "dX": hidden.grad, "dW": dW}, Path(out_dir) / "grads.pt")
        local_rows = (weight.to_local() if world > 1 else weight).shape[0]
        record = {"times_s": times, "collectives_s": collective, "peak_mem_mb": mem, "local_rows": local_rows}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        if world > 1:
            dist.destroy_process_group()
    if world > 1:  # leave without the interpreter's teardown, where a gloo rank now and then aborts
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_method(method: str, argv: list) -> dict:
    world, threads = METHODS[method]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(rank_main, args=(world, threads, free_port(), argv, out), nprocs=world)
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
        grads = torch.load(Path(out) / "grads.pt")
    first = ranks[0]
    return {
        "method": method,
        "processes": world,
        "threads_per_process": threads,
        "times_s": first["times_s"],
        "median_ms": statistics.median(first["times_s"]) * 1e3,
        "collectives_ms": statistics.median(first["collectives_s"]) * 1e3,
        "peak_mem_mb_per_process": [r["peak_mem_mb"] for r in ranks],
        "vocab_rows_per_process": [r["local_rows"] for r in ranks],
    }, grads


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=2048, help="rows (tokens)")
    p.add_argument("--B", type=int, default=8, help="groups of 2 responses (N / 2B rows each)")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None, help="JSON path (a PNG plot is written next to it)")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    results, first = [], None
    for m in args.methods:
        r, grads = run_method(m, argv)
        if first is None:
            first = grads
        r["rel_err_vs_first"] = {k: rel_err(grads[k], first[k]) for k in ("loss", "dX", "dW")}
        results.append(r)
        peaks = " / ".join(f"{x:.0f}" for x in r["peak_mem_mb_per_process"])
        collectives = f"(collectives {r['collectives_ms']:6.1f} ms)"
        print(f"{m:>22}: {r['median_ms']:8.1f} ms  {collectives}  peak {peaks} MiB")
    shape = f"N = {args.N}, H = {args.H}, V = {args.V}, fp32, fwd + bwd"
    record = {
        "shape": shape,
        "machine": machine("cpu"),
        "cpu_count": os.cpu_count(),
        "reps": args.reps,
        "results": results,
    }
    if args.out:
        path = Path(args.out)
        write_json(path, record)
        for r in results:
            r["peak_mem_mb"] = max(r["peak_mem_mb_per_process"])
        panels = [
            ("median_ms", "median time per call (ms)"),
            ("peak_mem_mb", "peak RSS rise per process (MiB)"),
        ]
        title = f"Vocabulary-parallel head, CPU ({shape})"
        bar_plot(results, path.with_suffix(".png"), title, panels, lambda name: name.startswith("TP"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
