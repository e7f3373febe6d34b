"""GPU readiness without a GPU: every Triton kernel variant the backend can launch compiles for sm_80
and sm_90, fp16/bf16 variants do not spill, and no index is multiplied with a stride in 32 bits.

``python -m wrpo_kernels.triton_backend.aot`` runs the backend's entry points on ``meta`` tensors to
record the launches they make (for each dtype, real vocabulary sizes and the self-test's odd shape,
bias and soft cap on and off, every loss type), compiles each distinct variant with Triton for both
targets and writes registers, spills and shared memory to benchmarks/results/triton_resources.json.
That file doubles as the cache: a variant is compiled again only when its kernel source, its
specialisation or the toolchain changed (a full compile takes ~70 s on a 2-core CPU); the heaviest
stored variant of each kernel and target is compiled again on every run and must reproduce its stored
figures. The int64 address arithmetic is also checked under the interpreter (``wide_offset``).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from wrpo_kernels import triton_backend
from wrpo_kernels.triton_backend import aot
from wrpo_kernels.triton_backend.indexing import wide_offset

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results" / "triton_resources.json"
# Largest shared memory per block: sm_80 tiles also run on sm_86/sm_89 (99 KiB), sm_90 228 KiB - 1 KiB.
SHARED_LIMIT = {"sm_80": 99 * 1024, "sm_90": 227 * 1024}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the ahead-of-time compile once per test session (a subprocess: the interpreter that the rest
    of the suite uses replaces the kernels, so they cannot be compiled in this process)."""
    summary = tmp_path_factory.mktemp("aot") / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "wrpo_kernels.triton_backend.aot",
        "--out",
        str(RESULTS),
        "--summary",
        str(summary),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert summary.exists(), f"aot did not run:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    info = json.loads(summary.read_text())
    assert not info["errors"], "compile errors:\n" + "\n\n".join(f"{k}\n{e}" for k, e in info["errors"])
    assert not info["mismatches"], f"stored figures no longer reproduce: {info['mismatches']}"
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    print(proc.stdout.strip())
    return json.loads(RESULTS.read_text())


def launched_kernels() -> set[str]:
    """Every kernel (``@triton.jit`` function named ``*_kernel``) defined in the Triton backend."""
    names = set()
    for mod in pkgutil.iter_modules(triton_backend.__path__):
        module = importlib.import_module(f"{triton_backend.__name__}.{mod.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if name.endswith("_kernel") and callable(fn) and fn.__module__ == module.__name__:
                names.add(name)
    return names


def test_every_kernel_compiles_for_both_targets(report):
    kernels = launched_kernels()
    assert kernels == {
        "_forward_logprobs_kernel",
        "_row_stats_kernel",
        "_row_grad_kernel",
        "_group_loss_kernel",
    }
    seen = {(v["kernel"], v["target"]) for v in report["variants"]}
    assert seen == {(k, t) for k in kernels for t in ("sm_80", "sm_90")}
    assert all("error" not in v for v in report["variants"])


def test_every_option_value_is_compiled(report):
    """Each boolean constexpr of each kernel in both states, every loss type, every dtype of the head
    kernels, and every case of the matrix (so that an option the launchers gain cannot slip out)."""
    by_kernel: dict = {}
    for v in report["variants"]:
        slot = by_kernel.setdefault((v["kernel"], v["target"]), {"dtype": set()})
        slot["dtype"].add(v["dtype"])
        for name, value in v["constexprs"].items():
            slot.setdefault(name, set()).add(value)
    for (kernel, target), values in by_kernel.items():
        for name, seen in values.items():
            if all(isinstance(x, bool) for x in seen):
                assert seen == {False, True}, f"{kernel} {target}: {name} only {seen}"
        if kernel != "_group_loss_kernel":
            assert values["dtype"] == {"fp32", "fp16", "bf16"}, (kernel, target)
        else:
            assert values["LOSS"] == {0, 1, 2}
    cases = {c for v in report["variants"] for c in v["cases"]}
    assert cases == {c.label for c in aot.cases()}


def test_row_kernel_blocks_for_real_vocabularies(report):
    blocks = {v["constexprs"]["BLOCK_V"] for v in report["variants"] if v["kernel"] == "_row_stats_kernel"}
    assert blocks == {4096, 512}  # V = 32000 .. 262144 -> 4096 columns a step; the self-test's V = 509 -> 512


def test_no_spills_in_fp16_bf16_and_shared_memory_fits(report):
    spilling = [
        (v["kernel"], v["target"], v["dtype"], v["constexprs"], v["spill_store_bytes"])
        for v in report["variants"]
        if v["dtype"] != "fp32" and (v["spill_store_bytes"] or v["spill_load_bytes"])
    ]
    assert not spilling
    for v in report["variants"]:
        assert v["registers"] <= 255
        assert v["shared_bytes"] <= SHARED_LIMIT[v["target"]], (v["kernel"], v["target"], v["shared_bytes"])


def test_offsets_of_rows_and_columns_are_64_bit(report):
    """No Triton IR multiplies a value derived from a ``stride*`` argument in 32 bits."""
    for v in report["variants"]:
        assert not v["narrow_stride_products"], (v["kernel"], v["target"], v["narrow_stride_products"])
        if v["kernel"] != "_group_loss_kernel":  # the head kernels address 2-D tensors through strides
            assert v["stride_params"], v["kernel"]


def test_the_ir_check_catches_a_32_bit_product():
    """The check itself, on the IR of the forward kernel as it was: cols[:, None] * stride_w in int32."""
    ttir = """
        %w_79 = tt.expand_dims %cols {axis = 1 : i32} : tensor<128xi32> -> tensor<128x1xi32> loc(#loc100)
        %w_80 = tt.splat %stride_w : i32 -> tensor<128x1xi32> loc(#loc100)
        %w_81 = arith.muli %w_79, %w_80 : tensor<128x1xi32> loc(#loc100)
        %a_66 = arith.extsi %stride_h : i32 to i64 loc(#loc95)
        %a_67 = tt.splat %a_66 : i64 -> tensor<64x1xi64> loc(#loc95)
        %a_68 = arith.muli %a_65, %a_67 : tensor<64x1xi64> loc(#loc95)
    """
    bad = aot.narrow_stride_products(ttir, ["stride_h", "stride_w"])
    assert bad == ["%w_81 = arith.muli %w_79, %w_80 : tensor<128x1xi32> loc(#loc100)"]


@triton.jit
def _offsets_kernel(idx_ptr, wide_ptr, narrow_ptr, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    idx = tl.load(idx_ptr + i)
    tl.store(wide_ptr + i, wide_offset(idx, stride))
    tl.store(narrow_ptr + i, (idx * stride).to(tl.int64))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the helper under the interpreter")
def test_wide_offset_is_exact_past_2_31():
    """Row 262143 of a [262144, 8256] weight starts 2.16e9 elements in: exact in int64, wrapped in int32."""
    idx = torch.tensor([0, 1, 2, 260111, 260112, 262143, 2**20, 2**31 - 1], dtype=torch.int32)
    stride = 8256
    wide, narrow = torch.empty(8, dtype=torch.int64), torch.empty(8, dtype=torch.int64)
    _offsets_kernel[(1,)](idx, wide, narrow, stride, BLOCK=8)
    expected = idx.to(torch.int64) * stride
    assert torch.equal(wide, expected)
    assert int(expected[4]) > 2**31 > int(expected[3])
    assert torch.equal(narrow[:4], expected[:4]) and not torch.equal(narrow[4:], expected[4:])  # int32 wraps
