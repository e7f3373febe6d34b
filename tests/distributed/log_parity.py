"""Comparing the logs of a multi-process run with those of one process (the DeepSpeed trainer tests),
and the ``accelerate launch`` command line those runs start with (:func:`zero_launch`)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from fsdp_step import free_port
from helpers.cli_runs import cli

__all__ = ["ACCELERATE", "ROOT", "assert_logs_match", "free_port", "zero_launch"]

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def zero_launch(stage: int = 3) -> list[str]:
    """``accelerate launch`` with examples/accelerate/zero{stage}.yaml, fp32, on a free port; the script
    and its arguments follow."""
    config = str(ROOT / f"examples/accelerate/zero{stage}.yaml")
    return [
        ACCELERATE,
        "launch",
        *cli(config_file=config, mixed_precision="no", main_process_port=free_port()),
    ]


def compared(entry: dict) -> dict:
    """The logged values that must agree: loss, grad_norm, logps/*, rewards/*. (Not sft's ``nll_loss``:
    a mean of each micro-batch's token mean, which depends on how the batch is split; its ``loss``,
    the step's token mean, must agree.)"""
    plain = ("loss", "grad_norm")
    return {k: v for k, v in entry.items() if k in plain or k.startswith(("logps/", "rewards/"))}


def assert_logs_match(many: list[dict], one: list[dict], *, beta: float, label: str) -> dict[str, float]:
    """Each logged step of ``many`` equals ``one``'s within 1e-5 relative; returns the largest relative
    difference per name (printed with -s). Rewards are beta (logp - ref logp), differences of fp32 sums
    of tens to hundreds: exact to beta ulp(logp), not 1e-5 relative, so 2 such ulps are allowed too."""
    assert [e["step"] for e in many] == [e["step"] for e in one]
    worst, failed = {}, []
    for a, b in zip(many, one, strict=True):
        step, a, b = b["step"], compared(a), compared(b)
        assert a.keys() == b.keys() and len(a) >= 2
        logps = [abs(v) for k, v in b.items() if k.startswith("logps/")]
        ulp = math.ulp(max(logps)) * 2**29 if logps else 0.0  # fp32's
        for name in a:
            rel = abs(a[name] - b[name]) / max(abs(b[name]), 1e-30) if a[name] != b[name] else 0.0
            worst[name] = max(worst.get(name, 0.0), rel)
            tolerance = 2 * beta * ulp if name.startswith("rewards/") else 1e-9
            if a[name] != pytest.approx(b[name], rel=1e-5, abs=tolerance):
                failed.append((step, name, a[name], b[name]))
    print(f"{label}, max relative difference:", json.dumps(worst, indent=1))
    assert not failed, failed
    return worst
