"""What the sweep reports from its rows: growth exponents in tokens, the console table, Markdown."""

from __future__ import annotations

import math
import statistics

from methods import GEMM, OURS
from sweep_grid import LAYOUTS


def fit_exponent(points) -> float | None:
    """Least-squares slope of log(y) on log(x): y ~ x^slope (None with under two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def growth(record: dict) -> list[dict]:
    """Per (layout, V, H, method) with two token counts or more: the log-log slopes of time and memory
    in tokens, and memory's rise per 1k tokens (first to last point)."""
    out = []
    ok = [r for r in record["rows"] if r["status"] == "ok"]

    def key(r):
        return r["layout"], r["V"], r["H"], r["method"]

    for lay, V, H, m in sorted({key(r) for r in ok}):
        rows = sorted((r for r in ok if key(r) == (lay, V, H, m)), key=lambda r: r["tokens"])
        if len(rows) < 2:
            continue
        entry = {
            "layout": lay,
            "V": V,
            "H": H,
            "method": m,
            "tokens": [r["tokens"] for r in rows],
            "time_exponent": fit_exponent([(r["tokens"], r["median_ms"]) for r in rows]),
        }
        mems = [r for r in rows if r.get("peak_mem_mb")]
        if len(mems) >= 2:
            entry["mem_exponent"] = fit_exponent([(r["tokens"], r["peak_mem_mb"]) for r in mems])
            a, b = mems[0], mems[-1]
            entry["mem_mb_per_1k_tokens"] = (
                1e3 * (b["peak_mem_mb"] - a["peak_mem_mb"]) / (b["tokens"] - a["tokens"])
            )
        out.append(entry)
    return out


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_table(record: dict) -> None:
    print(
        f"\n{record['machine']['device']}; {record['dtype']}; median of {record['reps']}; "
        f"memory cap {record.get('mem_cap_gb')} GiB"
    )
    print(
        f"{'layout':<9}{'V':>7}{'H':>6}{'tokens':>7}  {'method':<15}{'status':<13}{'median s':>9}"
        f"{'peak MiB':>9}{'vs naive':>9}{'GFLOP/s':>10}{'/gemm':>7}  note"
    )
    for r in record["rows"]:
        su = r.get("speedup_vs_naive")
        note = r.get("reason", "")[:70]
        print(
            f"{r['layout']:<9}{r['V']:>7}{r['H']:>6}{r['tokens']:>7}  {r['method']:<15}{r['status']:<13}"
            f"{fmt(r.get('median_ms') and r['median_ms'] / 1e3, '.3f'):>9}"
            f"{fmt(r.get('peak_mem_mb'), '.0f'):>9}"
            f"{fmt(su, '.2f') + ('x' if su else ''):>9}{fmt(r.get('gflops_6nhv'), '.1f'):>10}"
            f"{fmt(r.get('gemm_ratio'), '.2f'):>7}  {note}"
        )
    for g in record.get("growth", []):
        if g["method"] in ("naive-eager", *OURS, GEMM):
            print(
                f"growth {g['layout']} V={g['V']} {g['method']}: "
                f"time ~ N^{fmt(g['time_exponent'], '.2f')}, "
                f"memory ~ N^{fmt(g.get('mem_exponent'), '.2f')} "
                f"({fmt(g.get('mem_mb_per_1k_tokens'), '.0f')} MiB per 1k tokens)"
            )


def cell(r: dict | None) -> str:
    """A method's Markdown cell on one configuration: its time and memory, or its status."""
    if r is None:
        return ""
    if r["status"] == "ok":
        mem = f", {r['peak_mem_mb']:.0f} MiB" if r.get("peak_mem_mb") is not None else ""
        return f"{r['median_ms'] / 1e3:.2f} s{mem}"
    if r["status"] == "over cap" and r.get("predicted_mem_mb"):
        return f"over cap ({r['predicted_mem_mb'] / 1024:.1f} GiB pred.)"
    if r["status"] == "skipped":
        return "time budget" if r.get("reason", "").startswith("time budget") else "n/a"
    return r["status"]


def markdown(record: dict) -> str:
    """One table row per configuration: each method's time and peak memory (or its status), ours against
    naive and against the GEMMs alone, ours in GFLOP/s (6 N H V)."""
    methods = [m for m in dict.fromkeys(r["method"] for r in record["rows"]) if m != GEMM]
    head = ["layout", "V", "tokens", *methods, "GEMMs alone", "ours vs naive", "ours / GEMMs", "ours GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(LAYOUTS)
    for c in sorted(record["configs"], key=lambda c: (c["V"], order.index(c["layout"]), c["tokens"])):
        by = {r["method"]: r for r in record["rows"] if r["config"] == c["id"]}
        cells = [c["layout"], str(c["V"]), str(c["tokens"]), *(cell(by.get(m)) for m in methods)]
        g = by.get(GEMM)
        cells.append(f"{g['median_ms'] / 1e3:.2f} s" if g and g["status"] == "ok" else "-")
        ours = next((by[m] for m in OURS if m in by and by[m]["status"] == "ok"), None)
        su = ours and ours.get("speedup_vs_naive")
        cells.append(f"{su:.2f}x" if su else "-")
        cells.append(f"{ours['gemm_ratio']:.2f}" if ours and ours.get("gemm_ratio") else "-")
        cells.append(f"{ours['gflops_6nhv']:.0f}" if ours else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
