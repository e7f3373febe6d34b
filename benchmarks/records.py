"""What a results file says about where it was measured, and how it is written.

The machine record (platform, versions, the device in words), the short device tag that result file
names carry (``cpu``, ``h100``, ...), the dense bf16 peak the %-of-peak figures are measured against,
and an atomic JSON write.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (TFLOP/s) by device tag; the PCIe / NVL variants of a tag in the second table
PEAK_BF16_TFLOPS = {
    "h100": 989.4,
    "h200": 989.4,
    "gh200": 989.4,
    "h800": 989.4,
    "h20": 148.0,
    "b200": 2250.0,
    "b100": 1750.0,
    "a100": 312.0,
    "a800": 312.0,
    "l40s": 362.0,
    "l4": 121.0,
}
PEAK_BF16_VARIANTS = {("h100", "pcie"): 756.5, ("h100", "nvl"): 835.0, ("h200", "nvl"): 835.0}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = (line.split(":", 1)[1].strip() for line in lines if "model name" in line)
    return next(names, platform.processor())


def machine(device: str) -> dict:
    """Platform, versions and the device in words (GPU name, or CPU model with cores and threads)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        return info
    info["device"] = f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return info


def kernel_machine(device: str) -> dict:
    """:func:`machine` plus what decides which kernels ran: the native CPU row kernels, or CUDA, the
    GPU's bf16 peak, and Triton's version."""
    from wrpo_kernels import native

    info = machine(device)
    if device == "cpu":
        info["native_row_kernels"] = native.row_kernels_enabled(torch.device("cpu"))
    else:
        info["cuda"] = torch.version.cuda
        info["peak_bf16_tflops"] = peak_bf16_tflops(device)
    with contextlib.suppress(Exception):
        import triton

        info["triton"] = triton.__version__
    return info


def device_tag(device: str) -> str:
    """A short name for file names: "cpu", or the GPU model, e.g. "h100" for "NVIDIA H100 80GB HBM3"."""
    if device != "cuda":
        return device
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name().lower())
    words = [w for w in words if w not in ("nvidia", "tesla", "geforce", "rtx", "quadro")]
    return next((w for w in words if re.search(r"\d", w) and not w.endswith("gb")), "cuda")


def peak_bf16_tflops(device: str) -> float | None:
    """Dense bf16 peak of the CUDA device from a table of known GPUs; None if unknown (or a CPU)."""
    if device != "cuda":
        return None
    tag, name = device_tag(device), torch.cuda.get_device_name().lower()
    for (model, variant), peak in PEAK_BF16_VARIANTS.items():
        if tag == model and variant in name:
            return peak
    return PEAK_BF16_TFLOPS.get(tag)


def write_json(path: Path, record: dict, indent: int = 2) -> None:
    """Write through a temporary file, so that an interrupted run leaves no half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=indent))
    tmp.replace(path)
