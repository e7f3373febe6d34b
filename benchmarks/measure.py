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
