"""results.json (accuracies per method, family and seed, with intervals), the printed tables and the chart.

Over seeds, every method gets its mean and a 95% Student t-interval (mean ± t(0.975, n-1) · s / sqrt(n),
s the sample standard deviation); with one seed there is no interval ("n=1"). WRPO is compared with DPO
seed by seed: the paired differences WRPO - DPO (same seed, same data, same SFT checkpoint) and their
t-interval, which is narrower than the two methods' own intervals when the seeds move both alike.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from statistics import mean, stdev

ORDER = ("target", "target-sft", "target-sft-dpo", "target-sft-wrpo")
# t(0.975, df) for df = 1..30 (two-sided 95%); beyond, a Cornish-Fisher expansion (error < 1e-4)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: list[float]) -> dict:
    """{"n", "mean", "sd", "ci95": [low, high]}: sample sd and t-interval; sd and ci95 None when n = 1."""
    n, m = len(values), mean(values)
    if n == 1:
        return {"n": 1, "mean": m, "sd": None, "ci95": None}
    sd = stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "ci95": [m - half, m + half]}


def paired_runs(names) -> dict[str, tuple[str, str]]:
    """{"WRPO run - DPO run": (wrpo, dpo)}: each WRPO run against the DPO run at its beta."""
    pairs = {}
    for name in names:
        if not name.startswith("target-sft-wrpo"):
            continue
        beta = name.partition("-beta")[2]
        dpo = f"target-sft-dpo-beta{beta}" if beta else "target-sft-dpo"
        if dpo in names:
            pairs[f"{name} - {dpo}"] = (name, dpo)
    return pairs


def machine(parallel: int, threads: int) -> dict:
    """Where the run ran: CPU model, cores, the torch threads of each job and how many jobs ran at once."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    import torch

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads_per_job": threads,
        "parallel_jobs": parallel,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def collect(per_seed: list[dict], config: dict, machine_info: dict | None = None) -> dict:
    """{"methods": {name: {"accuracy": [per seed], "by_family": {family: [per seed]}, "interval",
    "by_family_interval"}}, "paired": {"A - B": {"per_seed", "interval"}}, "seeds", "config", "machine",
    "data": [per seed], "preference_stats": [per seed]}; per-seed lists follow ``config["seeds"]``."""
    methods: dict[str, dict] = {}
    for run in per_seed:
        for name, acc in run["methods"].items():
            m = methods.setdefault(name, {"accuracy": [], "by_family": {}})
            m["accuracy"].append(acc["accuracy"])
            for family, value in acc["by_family"].items():
                m["by_family"].setdefault(family, []).append(value)
    for m in methods.values():
        m["interval"] = interval(m["accuracy"])
        m["by_family_interval"] = {f: interval(v) for f, v in m["by_family"].items()}
    names = sorted(methods, key=lambda n: (n.startswith("source-"), ORDER.index(n) if n in ORDER else 9, n))
    paired = {}
    for label, (a, b) in paired_runs(names).items():
        diffs = [x - y for x, y in zip(methods[a]["accuracy"], methods[b]["accuracy"], strict=True)]
        paired[label] = {"per_seed": diffs, "interval": interval(diffs)}
    seeds = list(config.get("seeds", range(len(per_seed))))
    stats = [{"seed": s, **r.get("preference_stats", {})} for s, r in zip(seeds, per_seed, strict=True)]
    return {
        "methods": {n: methods[n] for n in names},
        "paired": paired,
        "seeds": seeds,
        "config": config,
        "machine": machine_info or {},
        "data": [r["data"] for r in per_seed],
        "preference_stats": stats,
    }


def fmt(iv: dict, signed: bool = False) -> str:
    """ "0.160 [0.120, 0.200]" (mean [95% interval]), or "0.160 (n=1)"."""
    f = "{:+.3f}" if signed else "{:.3f}"
    if iv["ci95"] is None:
        return f.format(iv["mean"]) + " (n=1)"
    low, high = iv["ci95"]
    return f"{f.format(iv['mean'])} [{f.format(low)}, {f.format(high)}]"


def table(results: dict) -> str:
    """Markdown: mean [95% t-interval] over seeds overall and per family; every seed's overall accuracy;
    the paired WRPO - DPO differences per seed with their interval; the preference data per seed."""
    methods, seeds = results["methods"], results["seeds"]
    families = list(next(iter(methods.values()))["by_family"])
    n = len(seeds)
    title = f"mean [95% t-interval] over {n} seeds" if n > 1 else "one seed (n=1): no interval"
    lines = [title, "", "| method | overall | " + " | ".join(families) + " |"]
    lines.append("|---" * (len(families) + 2) + "|")
    for name, m in methods.items():
        cells = [fmt(m["interval"]), *(fmt(m["by_family_interval"][f]) for f in families)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    lines += ["", f"| run (overall) | {seed_cols} |", "|---" * (n + 1) + "|"]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m["accuracy"]) + " |")
    if results.get("paired"):
        lines += ["", f"| paired difference | {seed_cols} | mean [95% t-interval] |", "|---" * (n + 2) + "|"]
        for label, p in results["paired"].items():
            cells = [f"{v:+.3f}" for v in p["per_seed"]] + [fmt(p["interval"], signed=True)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    stats = [s for s in results.get("preference_stats", []) if "kept" in s]
    if stats:
        lines += [
            "",
            "| preference data | kept / offered | y_ws right, y_wt wrong (of kept) |",
            "|---|---|---|",
        ]
        for s in stats:
            teach = f"{s['ws_correct_wt_wrong']} ({s['ws_correct_wt_wrong_fraction']:.1%})"
            lines.append(f"| seed {s['seed']} | {s['kept']} / {s['offered']} | {teach} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Grouped bars: one group per family and overall, one bar per method (mean, 95% t-interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    families = list(next(iter(methods.values()))["by_family"])
    groups = ["overall", *families]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 2, 4))
    colors = plt.get_cmap("tab20").colors
    for i, (name, m) in enumerate(methods.items()):
        ivs = [m["interval"], *(m["by_family_interval"][f] for f in families)]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        errs = [0.0 if iv["ci95"] is None else iv["ci95"][1] - iv["mean"] for iv in ivs]
        ax.bar(xs, [iv["mean"] for iv in ivs], width, yerr=errs, label=name, capsize=2,
               color=colors[i % len(colors)])  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    reward = results["config"].get("reward", "exact")
    ax.set_ylabel("held-out greedy exact match")
    ax.set_ylim(0, 1)
    n = len(results["seeds"])
    what = f"mean, 95% t-interval over {n} seeds" if n > 1 else "n=1 (one seed, no interval)"
    ax.set_title(f"Does it fuse? ({reward} reward) {what}")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / "results.png")
    return out_dir / "results.json"
