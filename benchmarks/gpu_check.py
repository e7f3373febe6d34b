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
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from gpu_children import auto_child, tests_child
from gpu_steps import LLAMA3_8B, TARGETS, TINY, Step, auto_step, bench_step, env_step, sweep_step, tests_step

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("env", "auto", "tests", "bench", "sweep")
# Wall-clock limit of each step (seconds): on the GPU, and in the tiny CPU dry run
BUDGET = {"env": 15, "auto": 45, "tests": 90, "bench": 195, "sweep": 120}
BUDGET_TINY = {"env": 15, "auto": 40, "tests": 45, "bench": 75, "sweep": 60}
TOTAL_BUDGET = 470  # the steps' limits sum to 465
MIN_STEP_S = 5  # a step is not started with less time than this left


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
        args.tests = (
            ["tests/wrpo_kernels/triton/test_triton_backend.py"]
            if args.tiny and args.device == "cpu"
            else ["tests"]
        )
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
