"""Compile every Triton kernel of the backend for NVIDIA GPUs on a machine without one.

    python -m wrpo_kernels.triton_backend.aot --out benchmarks/results/triton_resources.json

What gets compiled is not listed by hand: the backend's own entry points (fused loss with its
backward work, two-pass and forward-only log-probs, ``wrpo_loss``) run on ``meta`` tensors inside
:func:`.launch.recording` for each case of :func:`cases` (dtype, vocabulary and hidden size, bias,
soft cap, loss type, K) and each target architecture, and every distinct launch they make is
compiled the way Triton's JIT would compile it at that launch (same signature, constexprs,
divisibility hints, warps and stages). ptxas then reports registers, spills and shared memory per
kernel variant, and the Triton IR is checked for 32-bit products of an index with a stride
(see :mod:`.indexing`). Needs TRITON_INTERPRET unset: the interpreter replaces the kernels.

The report written with ``--out`` is also the cache of the next run: a variant whose kernel source,
specialisation and toolchain (Triton, ptxas) are unchanged keeps its figures instead of being
compiled again (a full compile takes ~70 s on 2 CPU cores), and the heaviest stored variant of each
kernel and target is compiled again every run and must reproduce them. ``--fresh`` compiles all.
tests/wrpo_kernels/triton/test_triton_compile.py runs this module and checks its report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import accumulate, product

import torch

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (name, V, H): real vocabularies, the GPU test's V*H > 2^31 shape, and autoselect's self-test shape
# (V and H multiples of nothing, so no divisibility hints: a different specialisation).
SHAPES = (
    ("llama2", 32000, 4096),
    ("llama3", 128256, 4096),
    ("gemma3", 262144, 3840),
    ("large", 262144, 8256),
    ("self-test", 509, 40),
)
LOSSES = (("dpo", 2, 1), ("dpo", 3, 2), ("simpo", 3, 2), ("ipo", 5, 3))  # (loss_type, K, num_chosen)


@dataclass(frozen=True)
class Case:
    shape: str
    V: int
    H: int
    dtype: str
    bias: bool
    softcap: bool
    loss_type: str
    K: int
    num_chosen: int

    @property
    def label(self) -> str:
        flags = [f for f, on in (("bias", self.bias), ("softcap", self.softcap)) if on]
        return (
            f"{self.shape} V={self.V} H={self.H} {self.dtype} {'+'.join(flags) or 'plain'} "
            f"{self.loss_type} K={self.K}"
        )


def cases(full: bool = False):
    """The cases whose launches are compiled: shape x dtype x bias x soft cap in full, each with one
    loss option (they cycle through :data:`LOSSES` with the flags, so every loss meets every dtype and
    shape). ``full=True`` crosses every loss option with everything else too (4x the cases; the loss
    options reach only the group-loss kernel, which reads no head tensor, so it finds the same variants)."""
    for (shape, V, H), dt, b, c in product(SHAPES, DTYPES, (False, True), (False, True)):
        losses = LOSSES if full else (LOSSES[(2 * b + c) % len(LOSSES)],)
        for loss, K, C in losses:
            yield Case(shape, V, H, dt, b, c, loss, K, C)


def _meta_batch(case: Case):
    """Two groups of odd-length responses on ``meta``: chunks of one group each start at even and odd
    rows, as real batches do (their label slices get, or miss, the 16-byte divisibility hint)."""
    from ..objective import make_spec
    from ..packing import PackedRows, sequence_ids

    dev, dt = torch.device("meta"), DTYPES[case.dtype]
    lengths = [3 + 2 * i for i in range(2 * case.K)]
    cu_host = [0, *accumulate(lengths)]
    N = cu_host[-1]
    cu = torch.empty(len(cu_host), dtype=torch.int64, device=dev)
    rows = PackedRows(
        cu, cu_host, sequence_ids(cu, N), torch.empty(2 * case.K, dtype=torch.int64, device=dev), lengths
    )
    spec = make_spec(
        responses_per_prompt=case.K, num_chosen=case.num_chosen, loss_type=case.loss_type, beta=0.1
    )

    def leaf(*shape):
        return torch.empty(*shape, dtype=dt, device=dev, requires_grad=True)

    hidden, weight = leaf(N, case.H), leaf(case.V, case.H)
    bias = leaf(case.V) if case.bias else None
    labels = torch.empty(N, dtype=torch.int64, device=dev)
    ref = torch.empty(2, case.K, dtype=torch.float32, device=dev)
    return spec, hidden, weight, bias, labels, rows, ref, sum(lengths[case.K :])  # the larger group


def record(case: Case, arch: int) -> list:
    """The launches the Triton backend makes for ``case`` on an sm_<arch> device."""
    from .. import triton_backend as tb
    from ..chunked import HeadOptions
    from ..head_inputs import HeadInputs
    from ..totals import OWN_COUNTS
    from .launch import recording

    spec, hidden, weight, bias, labels, rows, ref, group = _meta_batch(case)
    x = HeadInputs(hidden, weight, bias, labels, rows, HeadOptions(-100, 30.0 if case.softcap else None, 1.0))
    with recording(arch) as launches:
        # training: one chunk per group, and a budget below one group (two passes over row tiles)
        for chunk in (group, group // 2 + 1):
            tb.fused_linear_wrpo_loss(
                x, spec=spec, ref_logps=ref, nll_weight=0.5, totals=OWN_COUNTS, chunk_tokens=chunk
            )
        with torch.no_grad():  # reference model: the forward-only kernel
            tb.linear_logprobs(x, reduction="sum", chunk_tokens=None)
        logps = tb.linear_logprobs(x, reduction="sum", chunk_tokens=16)
        logps.sum().backward()  # two-pass: the backward recomputes the logits
        lengths = torch.empty(2, case.K, dtype=torch.float32, device="meta")
        policy = torch.empty(2, case.K, dtype=DTYPES[case.dtype], device="meta", requires_grad=True)
        tb.wrpo_loss(spec, policy, ref if spec.needs_reference else None, lengths)
    return launches


# ---- compiling one launch ---------------------------------------------------------------------


def specialise(launch, arch: int) -> dict:
    """What Triton's JIT would compile for ``launch`` on sm_<arch>: a picklable description."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{kernel!r} is not a compilable Triton kernel; unset TRITON_INTERPRET to compile for a GPU"
        )
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constexprs, **launch.options()}
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    names = [p.name for p in kernel.params]
    return {
        "module": kernel.fn.__module__,
        "kernel": kernel.fn.__name__,
        "source": kernel.cache_key,
        "arch": arch,
        "signature": signature,
        "constexprs": {names[k[0]]: v for k, v in constexprs.items()},
        "attrs": attrs,
        "hints": [names[k[0]] for k, a in sorted(attrs.items()) if a],  # divisible by 16
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
    }


def variant_key(v: dict) -> str:
    sig = ",".join(f"{k}:{t}" for k, t in v["signature"].items() if t != "constexpr")
    hints = ",".join(v["hints"])
    consts = ",".join(f"{k}={c}" for k, c in v["constexprs"].items())
    return f"{v['kernel']}|sm_{v['arch']}|{sig}|{consts}|hints={hints}|w{v['num_warps']}s{v['num_stages']}"


_VALUE = r"%[\w.#]+"
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "arith.extsi", "arith.extui")


def narrow_stride_products(ttir: str, stride_params) -> list[str]:
    """Lines of Triton IR that multiply a value derived from a ``stride*`` parameter in 32 bits."""
    derived = {f"%{p}" for p in stride_params}
    bad = []
    for line in ttir.splitlines():
        m = re.match(rf"\s*({_VALUE}) = ([\w.]+) (.*)$", line)
        if not m:
            continue
        result, op, rest = m.groups()
        operands, _, typ = rest.partition(" : ")
        if not derived.intersection(re.findall(_VALUE, operands)):
            continue
        if op in _PASS_THROUGH:
            derived.add(result)
        elif op == "arith.muli" and not re.match(r"(tensor<[\dx]*)?i64", typ.strip()):
            bad.append(line.strip())
    return bad


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills, stack and the ptxas version: ptxas -v with the flags Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [
            ptxas,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        log = subprocess.run(
            [*cmd, src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True
        )
    text = log.stderr + log.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs.group(1)),
        "spill_store_bytes": int(spills.group(1)) if spills else 0,
        "spill_load_bytes": int(spills.group(2)) if spills else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def compile_variant(v: dict) -> dict:
    """Compile one variant (from :func:`specialise`) and measure it; runs in a worker process."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(v["module"]), v["kernel"])
    consts = {(i,): v["constexprs"][p.name] for i, p in enumerate(kernel.params) if p.name in v["constexprs"]}
    t0 = time.perf_counter()
    try:
        k = triton.compile(
            ASTSource(kernel, v["signature"], consts, v["attrs"]),
            target=GPUTarget("cuda", v["arch"], 32),
            options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]},
        )
    except Exception as err:  # reported per variant; the test fails on any
        return {"error": f"{type(err).__name__}: {err}"[:2000]}
    out = _ptxas_report(k.asm["ptx"], v["arch"])
    out["shared_bytes"] = k.metadata.shared
    strides = [n for n in v["signature"] if n.startswith("stride")]
    out["stride_params"] = strides
    out["narrow_stride_products"] = narrow_stride_products(k.asm["ttir"], strides)
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    return out


# ---- the whole matrix -------------------------------------------------------------------------


def collect(archs=ARCHS, full: bool = False) -> dict[str, dict]:
    """Distinct variants over all cases and targets: key -> description with the cases that use it."""
    variants: dict[str, dict] = {}
    for arch in archs:
        for case in cases(full):
            for launch in record(case, arch):
                v = specialise(launch, arch)
                entry = variants.setdefault(variant_key(v), {**v, "cases": []})
                if case.label not in entry["cases"]:
                    entry["cases"].append(case.label)
    return variants


def _dtype_of(v: dict) -> str:
    """The operand dtype of a variant: fp16/bf16 if any pointer argument is, else fp32."""
    for t in v["signature"].values():
        if t in ("*fp16", "*bf16"):
            return t[1:]
    return "fp32"


def _toolchain(archs) -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    return {"triton": triton.__version__, "ptxas": {f"sm_{a}": get_ptxas(a).version for a in archs}}


RESULT_FIELDS = (
    "registers",
    "spill_store_bytes",
    "spill_load_bytes",
    "stack_bytes",
    "shared_bytes",
    "stride_params",
    "narrow_stride_products",
)


def build_report(archs=ARCHS, full=False, jobs=None, previous: dict | None = None, recheck: int = 1) -> dict:
    """Compile and measure every variant.

    ``previous``: an earlier report (the committed JSON). Its figures are reused for a variant whose
    kernel source (Triton's cache key, which covers the jit functions it calls), specialisation and
    toolchain are unchanged; all other variants are compiled. Of the reused ones, the ``recheck``
    heaviest (most registers) per kernel and target are compiled again all the same, and any
    difference from the stored figures is reported under ``mismatches``."""
    t0 = time.perf_counter()
    variants = collect(archs, full)
    t_record = time.perf_counter() - t0
    tools = _toolchain(archs)
    old = {}
    if previous and {k: previous.get(k) for k in tools} == tools:
        old = {r["key"]: r for r in previous.get("variants", ())}
    todo, reused = [], {}
    for key, v in variants.items():
        prev = old.get(key)
        if prev is not None and prev.get("source") == v["source"] and "error" not in prev:
            reused[key] = prev
        else:
            todo.append(key)
    by_group: dict = {}
    for key, prev in reused.items():
        by_group.setdefault((prev["kernel"], prev["target"]), []).append((-prev["registers"], key))
    rechecked = sorted(k for group in by_group.values() for _, k in sorted(group)[:recheck])
    keys = sorted(todo) + rechecked
    jobs = max(1, min(jobs or len(os.sched_getaffinity(0)), 8, len(keys)))
    t1 = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(compile_variant, [variants[k] for k in keys], chunksize=1)
    else:
        results = [compile_variant(variants[k]) for k in keys]
    fresh = dict(zip(keys, results, strict=True))
    mismatches = []
    for key in rechecked:
        want = {f: reused[key].get(f) for f in RESULT_FIELDS}
        got = {f: fresh[key].get(f) for f in RESULT_FIELDS}
        if want != got:
            mismatches.append({"key": key, "stored": want, "compiled": got})
    rows = []
    for key, v in sorted(variants.items()):
        res = fresh.get(key) or reused[key]
        rows.append(
            {
                "kernel": v["kernel"],
                "target": f"sm_{v['arch']}",
                "dtype": _dtype_of(v),
                "constexprs": v["constexprs"],
                "hints": v["hints"],
                "num_warps": v["num_warps"],
                "num_stages": v["num_stages"],
                **{f: res[f] for f in ("error", *RESULT_FIELDS) if f in res},
                "cases": sorted(v["cases"]),
                "key": key,
                "source": v["source"],
            }
        )
    return {
        **tools,
        "targets": [f"sm_{a}" for a in archs],
        "variants": rows,
        "compiled": len(keys),
        "reused": len(reused) - len(rechecked),
        "mismatches": mismatches,
        "record_s": round(t_record, 1),
        "compile_s": round(time.perf_counter() - t1, 1),
        "compile_s_each": {k: r.get("compile_s") for k, r in fresh.items()},
    }


DESCRIPTION = (
    "Registers, spills (bytes), stack and shared memory (bytes) of every Triton kernel variant the "
    "backend launches, per target, from ptxas -v on kernels compiled ahead of time without a GPU. "
    "'cases' lists the configurations that launch a variant; 'hints' the arguments specialised as "
    "divisible by 16. Written by tests/wrpo_kernels/triton/test_triton_compile.py "
    "(python -m wrpo_kernels.triton_backend.aot)."
)


def write_json(report: dict, path: str) -> None:
    """The committed form: no timings, stable order, so that a rerun with the same kernels rewrites
    the same bytes."""
    doc = {
        "what": DESCRIPTION,
        "triton": report["triton"],
        "ptxas": report["ptxas"],
        "targets": report["targets"],
        "variants": report["variants"],
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON report here (and reuse its figures where still valid)")
    p.add_argument("--summary", help="write counts, timings and mismatches here (JSON)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--full", action="store_true", help="every loss option with every head option")
    p.add_argument("--fresh", action="store_true", help="compile everything, reuse nothing")
    p.add_argument("--recheck", type=int, default=1, help="reused variants compiled again per kernel/target")
    p.add_argument("--jobs", type=int, default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    previous = None
    if args.out and os.path.exists(args.out) and not args.fresh:
        with open(args.out) as f:
            previous = json.load(f)
    report = build_report(tuple(args.arch), args.full, args.jobs, previous, args.recheck)
    bad = [r for r in report["variants"] if "error" in r]
    if args.out and not bad and not report["mismatches"]:
        write_json(report, args.out)
    if args.summary:
        with open(args.summary, "w") as f:
            summary = {k: v for k, v in report.items() if k != "variants"}
            json.dump({**summary, "errors": [(r["key"], r["error"]) for r in bad]}, f, indent=1)
    print(
        f"{len(report['variants'])} variants: {report['compiled']} compiled, {report['reused']} reused, "
        f"{len(bad)} failed, {len(report['mismatches'])} differ from the stored figures; "
        f"recording {report['record_s']} s, compiling {report['compile_s']} s"
    )
    return 1 if bad or report["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
