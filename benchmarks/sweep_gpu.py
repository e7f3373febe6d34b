"""GPU sweep of the fused head loss: V in {32k, 128k, 256k}, tokens in {4k, 16k}, H in {2048, 4096}.

Every configuration runs bench_head_loss's methods side by side (bf16, K = 3, 4 prompts; Liger on
K = 2); a method that fails (e.g. runs out of memory) is recorded as such and the others go on. The
configurations run smallest first; with --time-budget, one that would end past the budget is skipped
and recorded as such (estimate: the last one's timed steps scaled by the flop ratio, plus half its other
time, most of which is compiling). The JSON is rewritten
after every configuration, so a killed sweep leaves what it measured; one plot (TFLOP/s and peak memory)
at the end.

    python benchmarks/sweep_gpu.py --out "benchmarks/results/sweep_{device}.json"
    python benchmarks/sweep_gpu.py --vocabs 32000,262144 --tokens 4096 --hidden 4096 --time-budget 90
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_head_loss import device_tag, failures, machine, parse_args, print_table, run, write_json

VOCABS = (32000, 128256, 262144)
TOKENS = (4096, 16384)
HIDDEN = (2048, 4096)
METHODS = (
    "naive-eager,wrpo-torch,wrpo-triton,cce-logps,trl-chunked,wrpo-triton/k2,liger-dpo/k2,naive-eager/k2"
)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "tflops" in r]
    methods = sorted({r["method"] for r in measured})
    configs = sorted({(r["V"], r["tokens_k3"], r["H"]) for r in rows})
    labels = [
        f"V={v // 1000}k\nN={n // 1024}k H={h}" if n >= 1024 else f"V={v}\nN={n} H={h}" for v, n, h in configs
    ]
    fig, axes = plt.subplots(2, 1, figsize=(14, 8))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        for ax, key in ((axes[0], "tflops"), (axes[1], "peak_mem_mb")):
            vals = []
            for c in configs:
                hit = [r for r in measured if r["method"] == m and (r["V"], r["tokens_k3"], r["H"]) == c]
                vals.append(hit[0][key] if hit else 0)
            ax.bar([j + i * width for j in range(len(configs))], vals, width, label=m)
    axes[0].set_ylabel("TFLOP/s (model FLOPs)")
    axes[1].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.set_xticks([j + 0.4 for j in range(len(configs))], labels, fontsize=7)
    if methods:
        axes[0].legend(fontsize=7, ncol=4)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/sweep_{device}.json", help="{device}: cpu, h100, ...")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--B", type=int, default=4, help="prompts")
    p.add_argument("--vocabs", type=ints, default=VOCABS)
    p.add_argument("--tokens", type=ints, default=TOKENS, help="tokens of the K = 3 batch (B * 3 * T)")
    p.add_argument("--hidden", type=ints, default=HIDDEN)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole sweep")
    p.add_argument("--bench-args", default="", help="more bench_head_loss arguments, e.g. '--memory-inproc'")
    return p.parse_args(argv)


def main(argv=None):
    cli = parse(argv)
    t0 = time.perf_counter()
    out = Path(cli.out.format(device=device_tag(cli.device)))
    configs = sorted(
        ((V, N, H) for V in cli.vocabs for N in cli.tokens for H in cli.hidden),
        key=lambda c: c[0] * c[1] * c[2],
    )
    record = {"machine": machine(cli.device), "date": time.strftime("%Y-%m-%d"), "dtype": cli.dtype,
              "B": cli.B, "rows": [], "configs": []}  # fmt: skip
    last = None  # (flops, seconds of timed steps, other seconds) of the last configuration
    bad = []
    for V, N, H in configs:
        T = N // (3 * cli.B)  # B prompts x 3 responses
        entry = {"V": V, "H": H, "tokens_k3": 3 * cli.B * T}
        elapsed = time.perf_counter() - t0
        if cli.time_budget and last:
            estimate = last[1] * (V * N * H) / last[0] + 0.5 * last[2]
            if elapsed + estimate > cli.time_budget:
                entry["skipped"] = (
                    f"time budget: ~{estimate:.0f} s more after {elapsed:.0f} of {cli.time_budget:.0f} s"
                )
                print(f"skip V={V} N={N} H={H}: {entry['skipped']}")
                record["configs"].append(entry)
                continue
        print(f"\n== V={V} tokens={3 * cli.B * T} H={H}")
        argv = ["--device", cli.device, "--B", cli.B, "--T", T, "--H", H, "--V", V, "--dtype", cli.dtype,
                "--reps", cli.reps, "--methods", cli.methods, *cli.bench_args.split()]  # fmt: skip
        args = parse_args([str(a) for a in argv])
        start = time.perf_counter()
        report = run(args)
        seconds = time.perf_counter() - start
        steps = sum(
            r["median_ms"] / 1e3 * (cli.reps + 3) for r in report["results"]
        )  # + warm-up, check, memory
        last = (V * N * H, steps, max(seconds - steps, 0.0))
        print_table(report["results"], args, report)
        bad += [f"V={V} N={N} H={H} {b}" for b in failures(report)]
        entry.update(seconds=seconds, skipped_methods=report["skipped"], errors=report["errors"])
        record["configs"].append(entry)
        for r in report["results"]:
            record["rows"].append({"V": V, "H": H, "tokens_k3": entry["tokens_k3"], **r})
        for m, what in report["errors"].items():
            oom = "OutOfMemoryError" in what or "out of memory" in what
            record["rows"].append({"V": V, "H": H, "tokens_k3": entry["tokens_k3"], "method": m,
                                   "error": what, "oom": oom})  # fmt: skip
        write_json(out, record)  # after every configuration: a killed sweep keeps what it measured
    write_json(out, record)
    title = f"{record['machine']['device']} | {cli.dtype}, K=3 (Liger K=2), {cli.B} prompts"
    plot(record["rows"], out.with_suffix(".png"), title)
    done = sum("seconds" in c for c in record["configs"])
    print(f"\n{done} of {len(configs)} configurations in {time.perf_counter() - t0:.0f} s")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    for b in bad:
        print(f"FAILED {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
