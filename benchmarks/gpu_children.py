"""What ``gpu_check.py --child ...`` runs in its child processes: backend="auto"'s choice per dtype
(and the Triton self-test's verdict behind it), and the GPU tests under pytest."""

from __future__ import annotations

import json
import time
from pathlib import Path


def auto_child(device: str, dtypes: list[str], out: Path) -> int:
    """Ask backend="auto" what it runs per dtype, and record why (the self-test's verdict)."""
    import warnings

    import torch

    from wrpo_kernels import autoselect
    from wrpo_kernels.api import triton_unavailable_reason

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dev = torch.device(device)
    record = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtypes": {}}
    for name in dtypes:
        dtype, t = names[name], time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            picked = autoselect.auto_backend(dev, dtype)
        if dev.type == "cuda":
            verdict = None if picked == "triton" else str(caught[0].message) if caught else "?"
            why = (
                "the Triton kernels passed the self-test against the torch backend"
                if verdict is None
                else verdict
            )
        else:
            why = "not a CUDA device: auto runs the torch backend"
            verdict = None
            if triton_unavailable_reason(dev) is None and name == "fp32":  # the interpreter: fp32 only
                verdict = autoselect.triton_self_test(dev, dtype)
                why += f"; the Triton self-test under the interpreter: {verdict or 'passed'}"
        seconds = time.perf_counter() - t
        record["dtypes"][name] = {"picked": picked, "why": why, "self_test": verdict, "seconds": seconds}
        print(f"auto on {record['device']} {name}: {picked} ({why}; {seconds:.1f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    if dev.type == "cuda":  # on a GPU, auto should run the Triton kernels
        ok = all(d["picked"] == "triton" for d in record["dtypes"].values())
    else:
        ok = all(d["self_test"] is None for d in record["dtypes"].values())
    return 0 if ok else 1


class GpuSelection:
    """pytest plugin: keep the tests marked ``gpu`` and the unmarked ones named test_gpu*; count outcomes."""

    def __init__(self):
        self.marked, self.named, self.stats = 0, 0, {}

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            if item.get_closest_marker("gpu"):
                self.marked += 1
                keep.append(item)
            elif getattr(item, "originalname", item.name).startswith("test_gpu"):
                self.named += 1
                keep.append(item)
            else:
                drop.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_terminal_summary(self, terminalreporter):
        for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
            reports = terminalreporter.stats.get(key, [])
            if reports:
                self.stats[key] = [getattr(r, "nodeid", "?") for r in reports]


def tests_child(paths: list[str], out: Path) -> int:
    import pytest

    sel = GpuSelection()
    rc = int(pytest.main(["-q", "-rfEs", "-p", "no:cacheprovider", *paths], plugins=[sel]))
    record = {
        "exit_code": rc,
        "marked_gpu": sel.marked,
        "named_test_gpu": sel.named,
        "counts": {k: len(v) for k, v in sel.stats.items()},
        "failed": sel.stats.get("failed", []) + sel.stats.get("error", []),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"selected {sel.marked} test(s) marked gpu and {sel.named} unmarked test(s) named test_gpu*")
    return rc
