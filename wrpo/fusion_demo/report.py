"""results.json (accuracies per method, family and seed), the printed table and the bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean, pstdev

ORDER = ("target", "target-sft", "target-sft-dpo", "target-sft-wrpo")


def collect(per_seed: list[dict], config: dict) -> dict:
    """{"methods": {name: {"accuracy": [per seed], "by_family": {family: [per seed]}}}, "config", "data"}."""
    methods: dict[str, dict] = {}
    for run in per_seed:
        for name, acc in run["methods"].items():
            m = methods.setdefault(name, {"accuracy": [], "by_family": {}})
            m["accuracy"].append(acc["accuracy"])
            for family, value in acc["by_family"].items():
                m["by_family"].setdefault(family, []).append(value)
    names = sorted(methods, key=lambda n: (n.startswith("source-"), ORDER.index(n) if n in ORDER else 9, n))
    return {
        "methods": {n: methods[n] for n in names},
        "config": config,
        "data": [r["data"] for r in per_seed],
    }


def mean_std(values: list[float]) -> str:
    return f"{mean(values):.3f} ± {pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(results: dict) -> str:
    """A markdown table: mean ± std over seeds (population std), overall and per family."""
    families = list(next(iter(results["methods"].values()))["by_family"])
    lines = ["| method | overall | " + " | ".join(families) + " |", "|---" * (len(families) + 2) + "|"]
    for name, m in results["methods"].items():
        cells = [mean_std(m["accuracy"]), *(mean_std(m["by_family"][f]) for f in families)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Grouped bars: one group per family and overall, one bar per method (mean, std as error bar)."""
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
        series = [m["accuracy"], *(m["by_family"][f] for f in families)]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [mean(s) for s in series], width, yerr=[pstdev(s) for s in series], label=name, capsize=2,
               color=colors[i % len(colors)])  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out greedy exact match")
    ax.set_ylim(0, 1)
    n = len(next(iter(methods.values()))["accuracy"])
    ax.set_title(f"Does it fuse? mean ± std over {n} seed{'s' if n > 1 else ''}")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / "results.png")
    return out_dir / "results.json"
