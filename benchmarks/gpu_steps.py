"""The steps of ``gpu_check.py`` after ``env``: each runs its child (a script of benchmarks/, or
``gpu_check.py --child``) in its own process group under a time limit, reads the JSON it wrote, and
fills its Step: status, one line of figures, and rows for the summary table."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECK = HERE / "gpu_check.py"  # started again as ``--child auto`` / ``--child tests``
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
    rc = run_child([sys.executable, CHECK, *child], timeout, log, env)
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
        [sys.executable, CHECK, "--child", "tests", "--json", out, "--", *cfg.tests], timeout, log, env
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
