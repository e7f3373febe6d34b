"""GPU sweep of the fused head loss: V in {32k, 128k, 256k}, tokens in {4k, 16k}, H in {2048, 4096}.

Every configuration runs bench_head_loss's methods side by side (bf16, K = 3, 4 prompts); a method
that runs out of memory is recorded as such. One JSON and one plot (TFLOP/s and peak memory).

    python benchmarks/sweep_gpu.py --out benchmarks/results/sweep_cuda.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_head_loss import machine, parse_args, print_table, run, write_json

VOCABS = (32000, 128256, 262144)
TOKENS = (4096, 16384)
HIDDEN = (2048, 4096)
METHODS = "naive-eager,wrpo-torch,wrpo-triton,cce-logps,wrpo-triton/k2,liger-dpo/k2,naive-eager/k2"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    configs = sorted({(r["V"], r["tokens_k3"], r["H"]) for r in rows})
    labels = [f"V={v // 1000}k\nN={n // 1024}k H={h}" for v, n, h in configs]
    fig, axes = plt.subplots(2, 1, figsize=(14, 8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        for ax, key in ((axes[0], "tflops"), (axes[1], "peak_mem_mb")):
            vals = []
            for c in configs:
                hit = [r for r in rows if r["method"] == m and (r["V"], r["tokens_k3"], r["H"]) == c]
                vals.append(hit[0].get(key) or 0 if hit else 0)
            ax.bar([j + i * width for j in range(len(configs))], vals, width, label=m)
    axes[0].set_ylabel("TFLOP/s (model FLOPs)")
    axes[1].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.set_xticks([j + 0.4 for j in range(len(configs))], labels, fontsize=7)
    axes[0].legend(fontsize=7, ncol=4)
    fig.suptitle(f"{machine('cuda')['device']} | bf16, K=3 (Liger K=2), 4 prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/sweep_cuda.json")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", default=METHODS)
    cli = p.parse_args()
    rows = []
    for V in VOCABS:
        for N in TOKENS:
            for H in HIDDEN:
                T = N // 12  # 4 prompts x 3 responses

                def config(methods, T=T, H=H, V=V):
                    argv = ["--device", "cuda", "--B", "4", "--T", T, "--H", H, "--V", V, "--dtype", "bf16"]
                    return parse_args([*map(str, argv), "--reps", str(cli.reps), "--methods", methods])

                args = config(cli.methods)
                try:
                    results = run(args)
                except torch.OutOfMemoryError:  # one method at a time, to see which ones fit
                    results = []
                    for method in args.methods:
                        torch.cuda.empty_cache()
                        try:
                            results += run(config(method))
                        except torch.OutOfMemoryError:
                            results.append({"method": method, "oom": True})
                torch.cuda.empty_cache()
                print_table([r for r in results if not r.get("oom")], args)
                for r in results:
                    rows.append({"V": V, "H": H, "tokens_k3": 12 * T, **r})
    out = Path(cli.out)
    write_json(out, {"machine": machine("cuda"), "date": time.strftime("%Y-%m-%d"), "rows": rows})
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
