"""The benchmark plots: bar charts of one result per method, and the sweep's growth panels."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(
    results: list[dict],
    path: Path,
    title: str,
    panels: list[tuple[str, str]],
    highlight: Callable[[str], bool],
) -> None:
    """One horizontal bar chart per ``(key, axis label)`` of ``panels``, a bar per result (its
    ``method``); bars whose method satisfies ``highlight`` in green. Written to ``path`` (PNG)."""
    plt = pyplot()
    names = [r["method"] for r in results]
    colors = ["tab:green" if highlight(n) else "tab:gray" for n in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.45 * len(names) + 1.4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.barh(names, [r[key] for r in results], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        for i, r in enumerate(results):
            ax.text(r[key], i, f" {r[key]:.0f}", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def growth_plot(
    record: dict,
    path: Path,
    panel_title: Callable[[str], str],
    bold: tuple[str, ...],
    dashed: str,
) -> None:
    """The sweep's figure: per (layout, V, H) panel, time and peak memory against tokens N (log-log),
    a line per method (``bold`` ones thicker, ``dashed`` the GEMM floor); over-cap predictions hollow
    and dotted; the memory cap as a line. ``panel_title(layout)`` words the layout."""
    plt = pyplot()
    rows = record["rows"]
    panels = list(dict.fromkeys((r["layout"], r["V"], r["H"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    cap = record.get("mem_cap_gb")
    pairs = 2 if len(panels) > 3 else 1  # panels side by side: (time, memory) pairs per figure row
    nrows = math.ceil(len(panels) / pairs)
    figsize = (10.5 * pairs, 3.2 * nrows + 0.8)
    fig, grid = plt.subplots(nrows, 2 * pairs, figsize=figsize, squeeze=False)
    axes = [
        (grid[i // pairs][2 * (i % pairs)], grid[i // pairs][2 * (i % pairs) + 1]) for i in range(len(panels))
    ]
    for ax in grid.flat[2 * len(panels) :]:
        ax.axis("off")
    for (lay, V, H), (ax_t, ax_m) in zip(panels, axes, strict=True):
        here = [r for r in rows if (r["layout"], r["V"], r["H"]) == (lay, V, H)]
        ticks = sorted({r["tokens"] for r in here})
        for m in methods:
            mine = sorted((r for r in here if r["method"] == m), key=lambda r: r["tokens"])
            ok = [r for r in mine if r["status"] == "ok"]
            style = {
                "color": colors[m],
                "marker": "o",
                "ms": 4,
                "lw": 2.2 if m in bold else 1.2,
                "ls": "--" if m == dashed else "-",
            }
            if ok:
                ax_t.plot([r["tokens"] for r in ok], [r["median_ms"] / 1e3 for r in ok], label=m, **style)
                mem = [r for r in ok if r.get("peak_mem_mb")]
                if mem:
                    ax_m.plot([r["tokens"] for r in mem], [r["peak_mem_mb"] for r in mem], label=m, **style)
            over = [r for r in mine if r["status"] == "over cap" and r.get("predicted_mem_mb")]
            if over:  # predicted, not run: hollow markers, dotted, from the last measured point
                last = [r for r in ok if r.get("peak_mem_mb")][-1:]
                xs = [r["tokens"] for r in last + over]
                ys = [r["peak_mem_mb"] for r in last] + [r["predicted_mem_mb"] for r in over]
                label = f"{m} (over cap, predicted)"
                ax_m.plot(xs, ys, color=colors[m], ls=":", marker="o", mfc="none", ms=6, label=label)
        if cap:
            ax_m.axhline(cap * 1024, color="k", lw=0.8, ls="--")
            transform = ax_m.get_yaxis_transform()
            ax_m.text(0.01, cap * 1024, f"cap {cap:g} GiB", va="bottom", fontsize=7, transform=transform)
        title = f"{panel_title(lay)}, V={V}, H={H}"
        for ax, ylabel in ((ax_t, "fwd+bwd median (s)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=8)
            ax.grid(True, which="both", lw=0.3)
        for ax in (ax_t, ax_m):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    run_note = f"{record['dtype']}, {record['B']} prompts, median of {record['reps']}"
    fig.suptitle(f"{record['machine']['device']} | {run_note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
