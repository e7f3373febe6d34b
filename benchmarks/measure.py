"""What the benchmark scripts share: the machine's description, CPU peak-RSS probes, atomic JSON writes."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

# Child processes that measure peak RSS run with these, so large frees go back to the OS at once.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "0"}


def machine(device: str) -> dict:
    """Platform, versions and the device in words (GPU name, or CPU model with cores and threads)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        return info
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if "model name" in ln),
        platform.processor(),
    )  # fmt: skip
    info["device"] = f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return info


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its high-water mark (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_rise_mb(fn) -> float:
    """Peak RSS during ``fn()`` above the RSS before it (VmHWM reset through /proc/self/clear_refs)."""
    base = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return rss_mb("VmHWM") - base


def write_json(path: Path, record: dict) -> None:
    """Write through a temporary file so that an interrupted run leaves no half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def bar_plot(results: list[dict], path: Path, title: str, panels, highlight) -> None:
    """One horizontal bar chart per ``(key, axis label)`` of ``panels``, a bar per result (its
    ``method``); bars whose method satisfies ``highlight`` in green. Written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
