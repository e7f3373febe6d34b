"""One command for the first GPU machine (`make gpu-check`): tests, benchmarks and the auto self-test.

Steps, each in its own process group under a time limit (a step past its limit is killed and recorded
as failed; the next one runs), all within --budget seconds (default 470, under 8 minutes on one
H100/H200, set-up excluded; a step is not started with under 5 s left). Limit in seconds:

  env     15  the device, torch / CUDA / Triton versions, which optional peers are installed
  auto    45  backend="auto"'s choice per dtype (bf16, fp16, fp32) and why: the Triton self-test's verdict
  tests   90  the GPU tests: those marked ``gpu`` (pytest -m gpu), and those named test_gpu* without the mark
  bench  195  benchmarks/bench_head_loss.py on the Llama-3-8B head (H=4096, V=128256, bf16, 4 prompts x 3
              responses x 1024 tokens): naive eager / torch.compile, Liger, cut-cross-entropy, TRL's
              chunked head, our torch and Triton backends, with the loss/gradient check; methods not built
              (compiled) by 45% of the limit are skipped, slow-compiling peers last
  sweep  120  benchmarks/sweep.py cut down to K = 3 x V in {32k, 128k, 256k} x tokens in {4k, 16k} x
              H=4096 (with the GEMM-only floor), no check; it starts no configuration it expects to end
              past its limit - 25 s, dropping naive-compile first

Writes under --out-dir (default benchmarks/results), file names with the device (h100, h200, ...):
head_loss_llama3_8b_{device}.json/.png, sweep_{device}.json/.png, autoselect_{device}.json,
gpu_tests_{device}.json, gpu_check_{device}.json (this summary) and gpu_check_{device}.log (every step's
output). Ends with one table: per step ok / failed / skipped (why), wall time, headline figures, and the
head's targets next to the measured values (reported, never fatal). Exit code 1 if a step failed.
A missing optional peer (liger-kernel, cut-cross-entropy, trl, flash-attn) is skipped with a line.
Nothing is downloaded: the children run with HF_HUB_OFFLINE=1.

    python benchmarks/gpu_check.py                        # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run              # every step on tiny CPU shapes, < 1 min
    python benchmarks/gpu_check.py --steps bench --limit bench=300
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("env", "auto", "tests", "bench", "sweep")
# Wall-clock limit of each step (seconds): on the GPU, and in the tiny CPU dry run
BUDGET = {"env": 15, "auto": 45, "tests": 90, "bench": 195, "sweep": 120}
BUDGET_TINY = {"env": 15, "auto": 40, "tests": 45, "bench": 75, "sweep": 60}
TOTAL_BUDGET = 470  # the steps' limits sum to 465
MIN_STEP_S = 5  # a step is not started with less time than this left
PEERS = {  # distribution -> module, and what the check does without it
    "liger-kernel": ("liger_kernel", "liger-dpo/k2 is skipped"),
    "cut-cross-entropy": ("cut_cross_entropy", "cce-logps is skipped"),
    "trl": ("trl", "trl-chunked is skipped"),
    "flash-attn": (
        "flash_attn",
        "packed rows train with wrpo_segments attention; nothing of flash-attn is checked",
    ),
}
# The head's targets at the Llama-3-8B shape (reported against, never fatal)
TARGETS = {"pct_peak": 65.0, "vs_naive": 1.2, "vs_liger": 1.5, "extra_mib": 1024.0}
LLAMA3_8B = {"B": 4, "T": 1024, "H": 4096, "V": 128256, "dtype": "bf16"}
TINY = {"B": 1, "T": 8, "H": 16, "V": 128, "dtype": "fp32"}


# ---------------------------------------------------------------------------------------------------
# children: the auto self-test and the pytest run, started as `gpu_check.py --child ...`


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


# ---------------------------------------------------------------------------------------------------
# the driver


class Step:
    def __init__(self, name, budget):
        self.name, self.budget, self.limit = name, budget, budget
        self.status, self.seconds, self.figures, self.rows, self.record = "skipped", 0.0, "", [], None


def run_child(cmd, timeout, log, env):
    """Run ``cmd`` in its own process group, streaming its output; -> (exit code or None if timed out)."""
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "bufsize": 1}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, start_new_session=True, **pipes)

    def pump():
        for line in proc.stdout:
            sys.stdout.write("  | " + line)
            sys.stdout.flush()
            log.write(line)
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the child's own group, started above
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                break
        rc = None
    reader.join(timeout=5)
    return rc


def flags(options: dict) -> list:
    """Command-line words of ``options``: {"device": "cuda", "B": 4} -> ["--device", "cuda", "--B", 4]."""
    return [word for name, value in options.items() for word in (f"--{name}", value)]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def env_step(step, cfg):
    import torch

    info = [f"torch {torch.__version__}"]
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            step.status, step.figures = "failed", "no CUDA device (torch.cuda.is_available() is False)"
            return
        info.insert(0, torch.cuda.get_device_name())
        info.append(f"CUDA {torch.version.cuda}")
    else:
        info.insert(0, "CPU dry run" if cfg.tiny else "CPU")
    for dist in ("triton",):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info.append(f"{dist} {importlib.metadata.version(dist)}")
    present, missing = [], []
    for dist, (module, without) in PEERS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or shadowed package
            found = False
        if found:
            try:
                present.append(f"{dist} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                present.append(dist)
        else:
            missing.append(dist)
            print(f"skip {dist}: not installed; {without}")
            step.rows.append((f"{dist}", "not installed", f"skipped: {without}"))
    step.status = "ok"
    step.figures = "; ".join(info) + (" | peers: " + ", ".join(present) if present else "")
    step.record = {"info": info, "peers": present, "missing": missing}


def auto_step(step, cfg, log, env, timeout):
    out = cfg.path("autoselect_{device}.json")
    dtypes = "fp32" if cfg.device == "cpu" else "bf16,fp16,fp32"
    child = flags({"child": "auto", "device": cfg.device, "dtypes": dtypes, "json": out})
    rc = run_child([sys.executable, __file__, *child], timeout, log, env)
    rec = read_json(out) if rc is not None else None
    if rec:
        step.record = rec
        cfg.auto_pick = rec["dtypes"].get(cfg.dtype, {}).get("picked")
        step.figures = " | ".join(f"{k} -> {v['picked']}" for k, v in rec["dtypes"].items())
        for k, v in rec["dtypes"].items():
            step.rows.append((f"auto, {k}", v["picked"], v["why"]))
    step.status = "ok" if rc == 0 and rec else "failed"
    if rc is None:
        step.figures = f"timed out after {timeout:.0f} s"
    elif not rec:
        step.figures = f"exit code {rc}, no result"


def child_record(step, rc, out, timeout):
    """The JSON a child step wrote, or None with the step marked failed (timed out, or no result)."""
    if rc is None:
        step.status, step.figures = "failed", f"timed out after {timeout:.0f} s"
        return None
    rec = read_json(out)
    if not rec:
        step.status, step.figures = "failed", f"exit code {rc}, no result"
        return None
    return rec


def tests_step(step, cfg, log, env, timeout):
    out = cfg.path("gpu_tests_{device}.json")
    rc = run_child(
        [sys.executable, __file__, "--child", "tests", "--json", out, "--", *cfg.tests], timeout, log, env
    )
    rec = child_record(step, rc, out, timeout)
    if rec is None:
        return
    step.record = rec
    counts = ", ".join(f"{n} {k}" for k, n in rec["counts"].items()) or "none ran"
    step.figures = (
        f"{counts} ({rec['marked_gpu']} marked gpu, {rec['named_test_gpu']} named test_gpu* unmarked)"
    )
    for nodeid in rec["failed"]:
        step.rows.append(("failed", nodeid, ""))
    selected = rec["marked_gpu"] + rec["named_test_gpu"]
    if cfg.device == "cuda" and selected == 0:
        step.status, step.figures = "failed", "no GPU test selected"
    else:
        step.status = "ok" if rc == 0 else "failed"


def fmt_x(x):
    return f"{x:.2f}x" if x else "-"


def bench_step(step, cfg, log, env, timeout):
    shape = TINY if cfg.tiny else LLAMA3_8B
    out = cfg.path("head_loss_llama3_8b_{device}.json" if not cfg.tiny else "head_loss_tiny_{device}.json")
    options = {
        "device": cfg.device,
        **{k: shape[k] for k in ("B", "T", "H", "V", "dtype")},
        "reps": 2 if cfg.tiny else 10,
        "time-budget": int(timeout),
        "out": out,
    }
    cmd = [sys.executable, HERE / "bench_head_loss.py", *flags(options)]
    if cfg.tiny:
        cmd += ["--compile-backend", "aot_eager", "--memory-inproc"]
    if cfg.peak_tflops:
        cmd += ["--peak-tflops", cfg.peak_tflops]
    rc = run_child(cmd, timeout, log, env)
    rec = child_record(step, rc, out, timeout)
    if rec is None:
        return
    step.record = {"json": str(out)}
    step.status = "ok" if rc == 0 else "failed"
    by = {r["method"]: r for r in rec["results"]}
    head = {"triton": "wrpo-triton", "torch": "wrpo-torch"}.get(cfg.auto_pick or "triton", "wrpo-triton")
    if head not in by:
        head = next((m for m in ("wrpo-triton", "wrpo-torch") if m in by), None)
    if head is None:
        step.status, step.figures = "failed", "none of our backends ran"
        return
    r = by[head]
    k2 = by.get(head + "/k2", {})
    tokens = r["tokens"]
    step.figures = (
        f"{head} (auto's pick: {cfg.auto_pick or '?'}), {tokens} tokens: {r['median_ms']:.1f} ms fwd+bwd"
    )
    dry = " (dry run: tiny CPU shapes, not comparable)" if cfg.tiny else ""

    def target(value, bar, higher=True):
        if value is None:
            return "n/a"
        met = value >= bar if higher else value <= bar
        return ("met" if met else "BELOW target") + dry

    pct = r.get("pct_peak_6nhv")
    vs_naive, vs_liger, extra = r.get("speedup_vs_naive"), k2.get("speedup_vs_liger"), r["extra_mem_mb"]
    step.rows += [
        (
            "% of bf16 peak (6NHV)",
            f"{pct:.0f}%" if pct else "n/a (peak unknown)",
            f">= {TARGETS['pct_peak']:.0f}%: {target(pct, TARGETS['pct_peak'])}",
        ),
        (
            "speed-up vs naive-eager",
            fmt_x(vs_naive),
            f">= {TARGETS['vs_naive']}x: {target(vs_naive, TARGETS['vs_naive'])}",
        ),
        ("speed-up vs naive-compile", fmt_x(r.get("speedup_vs_compile")), ""),
        (
            f"speed-up vs Liger ({head}/k2, K=2)",
            fmt_x(vs_liger),
            f">= {TARGETS['vs_liger']}x: {target(vs_liger, TARGETS['vs_liger'])}",
        ),
        (
            "memory above the gradients",
            f"{round(extra) + 0} MiB",
            f"<= {TARGETS['extra_mib']:.0f} MiB: {target(extra, TARGETS['extra_mib'], False)}",
        ),
    ]
    for m, other in by.items():
        if m != head:
            pct = f"{other['pct_peak_6nhv']:.0f}% of peak, " if other.get("pct_peak_6nhv") else ""
            extra = round(other["extra_mem_mb"]) + 0
            vs = f"{pct}{fmt_x(other.get('speedup_vs_naive'))} naive, {extra} MiB above grads"
            step.rows.append((m, f"{other['median_ms']:.1f} ms", vs))
    checked = [x for x in rec["results"] if x.get("check")]
    bad = [x["method"] for x in checked if not x["check"]["ok"]]
    verdict = "FAILED: " + ", ".join(bad) if bad else ""
    step.rows.append(("check vs reference", f"{len(checked) - len(bad)} of {len(checked)} ok", verdict))
    for m, why in rec.get("skipped", {}).items():
        step.rows.append((f"{m}", "skipped", why))
    for m, what in rec.get("errors", {}).items():
        step.rows.append((f"{m}", "failed", what[:120]))


def sweep_step(step, cfg, log, env, timeout):
    out = cfg.path("sweep_{device}.json" if not cfg.tiny else "sweep_tiny_{device}.json")
    if cfg.tiny:
        grid = {"grid": "tiny", "layouts": "K2,K3", "vocabs": "96,160", "tokens": "24"}
        grid = flags({**grid, "methods": "naive-eager,wrpo-torch"})
        bench_args = "--memory-inproc"
    else:
        methods = "naive-eager,wrpo-torch,wrpo-triton,cce-logps,trl-chunked,gemm-only"
        grid = {"grid": "gpu", "layouts": "K3", "vocabs": "32000,128256,262144", "tokens": "4096,16384"}
        grid = flags({**grid, "hidden": "4096", "reps": "3"})
        grid += ["--no-check", *flags({"methods": methods})]
        bench_args = ""  # the bench step checks the loss and gradients; here time goes to configs
    if cfg.peak_tflops:
        bench_args += f" --peak-tflops {cfg.peak_tflops}"
    if bench_args.strip():
        grid.append(f"--bench-args={bench_args.strip()}")
    # the sweep stops starting configurations at its share, leaving time for the last one and the plot
    share = max(timeout - (10 if cfg.tiny else 25), 1)
    cmd = [
        sys.executable,
        HERE / "sweep.py",
        "--device",
        cfg.device,
        "--out",
        out,
        "--time-budget",
        share,
        *grid,
    ]
    rc = run_child(cmd, timeout, log, env)
    rec = read_json(out)  # rewritten after every configuration: a killed sweep still has its rows
    if rc is None:
        step.status = "failed"
        step.figures = f"timed out after {timeout:.0f} s"
    else:
        step.status = "ok" if rc == 0 and rec else "failed"
    if not rec:
        step.figures = step.figures or f"exit code {rc}, no result"
        return
    step.record = {"json": str(out)}
    done = [c for c in rec["configs"] if c.get("status") == "done"]
    left = [c for c in rec["configs"] if c.get("status") == "skipped"]
    figures = f"{len(done)} configs measured" + (f", {len(left)} skipped (time budget)" if left else "")
    step.figures = (step.figures + "; " if step.figures else "") + figures
    rows = [r for r in rec["rows"] if r.get("status") == "ok"]
    for m in sorted({r["method"] for r in rows if r["method"].startswith("wrpo-")}):
        mine = [r for r in rows if r["method"] == m]
        pct = [r["pct_peak_6nhv"] for r in mine if r.get("pct_peak_6nhv")]
        su = [r["speedup_vs_naive"] for r in mine if r.get("speedup_vs_naive")]
        pct_text = f"{min(pct):.0f}-{max(pct):.0f}% of peak; " if pct else ""
        su_text = f"{min(su):.2f}-{max(su):.2f}x naive" if su else ""
        step.rows.append((m, f"{len(mine)} configs", pct_text + su_text))
    gemm = [r["gemm_ratio"] for r in rows if r["method"].startswith("wrpo-") and r.get("gemm_ratio")]
    if gemm:
        step.rows.append(("ours / GEMMs alone", f"{len(gemm)} configs", f"{min(gemm):.2f}-{max(gemm):.2f}x"))
    short = [r for r in rec["rows"] if r.get("status") in ("oom", "over cap")]
    ooms = [f"{r['method']} V={r['V']} N={r['tokens']} H={r['H']}" for r in short]
    if ooms:
        step.rows.append(("out of memory", f"{len(ooms)}", "; ".join(ooms)[:160]))


class Config:
    def __init__(self, args):
        self.device = args.device
        self.tiny = args.tiny
        self.dtype = (TINY if args.tiny else LLAMA3_8B)["dtype"]
        self.out_dir = Path(args.out_dir)
        self.tests = args.tests
        self.peak_tflops = args.peak_tflops
        self.tag = "cpu"
        self.auto_pick = None

    def path(self, pattern):
        return self.out_dir / pattern.format(device=self.tag)


def step_record(s: Step) -> dict:
    """A step as the summary JSON records it."""
    fields = {"name": s.name, "status": s.status, "seconds": s.seconds, "limit_s": s.limit}
    return {**fields, "figures": s.figures, "rows": s.rows, "record": s.record}


def print_summary(cfg, steps, total):
    print("\n" + "=" * 110)
    print(
        f"GPU check summary ({'dry run, ' if cfg.tiny else ''}device tag {cfg.tag}; results in {cfg.out_dir})"
    )
    print(f"{'step':<8}{'status':<9}{'time s':>8}{'limit s':>9}  figures")
    for s in steps:
        print(f"{s.name:<8}{s.status:<9}{s.seconds:>8.1f}{s.limit:>9.0f}  {s.figures}")
        for a, b, c in s.rows:
            print(f"{'':<8}  .. {a:<40} {b:<18} {c}")
    print(f"{'total':<8}{'':<9}{total:>8.1f}{cfg.total_budget:>9.0f}")
    print("=" * 110)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu: the dry run)")
    p.add_argument("--dry-run", action="store_true", help="--device cpu --tiny, results to a temporary dir")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (dry run: a temporary dir)")
    p.add_argument(
        "--budget", type=float, default=None, help=f"seconds for all steps (default {TOTAL_BUDGET})"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for an unlisted GPU")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument(
        "--limit", action="append", default=[], metavar="STEP=SECONDS", help="another time limit for a step"
    )
    p.add_argument(
        "--tests", nargs="+", default=None, help="test paths (default: tests; dry run: the Triton tests)"
    )
    p.add_argument("--child", choices=("auto", "tests"), help=argparse.SUPPRESS)
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    args.device = args.device or "cuda"
    if args.out_dir is None:
        args.out_dir = (
            tempfile.mkdtemp(prefix="wrpo-gpu-check-")
            if args.dry_run
            else str(ROOT / "benchmarks" / "results")
        )
    if args.tests is None:
        args.tests = ["tests/test_triton_backend.py"] if args.tiny and args.device == "cpu" else ["tests"]
    unknown = set(args.steps.split(",")) - set(STEPS)
    args.limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--limit {item!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        args.limits[name] = float(seconds)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child == "auto":
        return auto_child(args.device, args.dtypes.split(","), Path(args.json))
    if args.child == "tests":
        return tests_child(args.rest, Path(args.json))

    cfg = Config(args)
    budgets = {**(BUDGET_TINY if args.tiny else BUDGET), **args.limits}
    cfg.total_budget = args.budget or (sum(budgets.values()) if args.tiny else TOTAL_BUDGET)
    wanted = args.steps.split(",")
    t0 = time.perf_counter()
    deadline = t0 + cfg.total_budget
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **offline}
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels run on CPU tensors through the interpreter
        if args.tiny:  # tiny tensors: more threads only add contention
            env.setdefault("OMP_NUM_THREADS", "1")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    if args.device == "cuda" and torch.cuda.is_available():
        sys.path.insert(0, str(HERE))
        from records import device_tag

        cfg.tag = device_tag("cuda")
    elif args.device != "cuda":
        cfg.tag = args.device
    log_path = cfg.path("gpu_check_{device}.log")
    steps = [Step(name, budgets[name]) for name in STEPS]
    with open(log_path, "w") as log:
        for step in steps:
            if step.name not in wanted:
                step.figures = "not selected (--steps)"
                continue
            left = deadline - time.perf_counter()
            if step.name != "env" and steps[0].status == "failed":
                step.figures = (
                    "no CUDA device: nothing to run (python benchmarks/gpu_check.py --dry-run runs on CPU)"
                )
                continue
            if left < MIN_STEP_S:
                step.figures = f"no time left of the {cfg.total_budget:.0f} s budget"
                continue
            timeout = step.limit = min(step.budget, left)
            print(f"\n== {step.name} (limit {timeout:.0f} s)", flush=True)
            log.write(f"\n== {step.name} (limit {timeout:.0f} s)\n")
            start = time.perf_counter()
            try:
                if step.name == "env":
                    env_step(step, cfg)
                else:
                    fn = {"auto": auto_step, "tests": tests_step, "bench": bench_step, "sweep": sweep_step}
                    fn[step.name](step, cfg, log, env, timeout)
            except Exception as err:  # a bug in this driver: record it, go on with the next step
                step.status, step.figures = "failed", f"{type(err).__name__}: {err}"
            step.seconds = time.perf_counter() - start
            print(f"-- {step.name}: {step.status} in {step.seconds:.1f} s", flush=True)
    total = time.perf_counter() - t0
    print_summary(cfg, steps, total)
    summary = {
        "device_tag": cfg.tag,
        "dry_run": bool(args.tiny),
        "total_s": total,
        "budget_s": cfg.total_budget,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "targets": TARGETS,
        "steps": [step_record(s) for s in steps],
    }
    summary_path = cfg.path("gpu_check_{device}.json")
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {summary_path} and {log_path}")
    failed = [s.name for s in steps if s.name in wanted and s.status != "ok"]
    if failed:
        print(f"gpu-check: {', '.join(failed)} did not pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
