"""Timing and memory measurement shared by the benchmark scripts.

Timing: methods run interleaved, round-robin in one process, the order rotated by one method every
round, so that drifts of the machine (another job, clock changes, the allocator returning memory after
a large step) hit every method alike instead of whichever runs next; figures are medians over rounds,
and two methods are compared round by round (:func:`paired_ratios`).

Memory: on CUDA the peak allocated above what is allocated before the call; on the CPU the peak RSS
rise over the call (VmHWM reset through /proc/self/clear_refs), best in a fresh process
(:func:`memory_in_child`) with large allocations forced to mmap (:data:`MMAP_ENV`), so that frees go
back to the OS at once and one method's freed pages do not hide the next one's peak.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Child processes that measure peak RSS run with these, so large frees go back to the OS at once.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "0"}


def error_text(err: BaseException, limit: int = 500) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters of message, for results files."""
    return f"{type(err).__name__}: {str(err).strip()[:limit]}"


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def rotated(names: Sequence[str], r: int) -> list[str]:
    """``names`` in the order of round ``r``: starting ``r`` places later, wrapping around."""
    k = r % max(len(names), 1)
    return [*names[k:], *names[:k]]


@dataclass
class Rounds:
    """Per method, one figure per round: wall seconds, process CPU seconds; and the methods that raised
    (``Type: message``), dropped from the rounds after theirs."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def interleaved(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Rounds:
    """Time ``calls`` (name -> one call) for ``rounds`` rounds, interleaved and rotated (module doc).

    A call that raises is recorded in ``errors`` and left out from then on (its times dropped); the
    others go on. The process CPU time is kept beside the wall time: on a shared machine other jobs
    stretch the wall time more than the CPU time."""
    names = list(calls)
    out = Rounds({m: [] for m in names}, {m: [] for m in names})
    for r in range(rounds):
        for m in rotated(names, r):
            if m in out.errors:
                continue
            try:
                sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                calls[m]()
                sync(device)
                out.wall[m].append(time.perf_counter() - wall)
                out.cpu[m].append(time.process_time() - cpu)
            except Exception as err:  # record it, go on with the others
                out.errors[m] = error_text(err)
                del out.wall[m], out.cpu[m]
                if log:
                    log(f"error in {m}: {out.errors[m]}")
    return out


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round-by-round ratios of two methods' times from the same rounds (e.g. baseline / ours)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def rss_mb(field_name: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its high-water mark (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_rise_mb(fn: Callable[[], object]) -> float:
    """Peak RSS during ``fn()`` above the RSS before it, in MiB."""
    base = rss_mb()
    reset_peak_rss()
    fn()
    return rss_mb("VmHWM") - base


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one ``fn()`` above what is allocated before it, in MiB: CUDA max allocated, or
    the CPU's peak RSS rise."""
    if device != "cuda":
        return peak_rss_rise_mb(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_in_child(cmd: Sequence[object], what: str) -> float:
    """Run ``cmd`` (a fresh Python process that prints a peak in MiB on its last line) under
    :data:`MMAP_ENV`; -> that figure. ``what`` names the measurement in the error."""
    env = {**os.environ, **MMAP_ENV}
    out = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {what} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
