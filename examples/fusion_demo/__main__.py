"""``python -m fusion_demo [--quick] [--reward exact|graded] [--out DIR] [--seeds S ...]``: the whole
demo, then the tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from fusion_demo import report
from fusion_demo.config import REWARDS, preset
from fusion_demo.jobs import torch_threads
from fusion_demo.pipeline import num_steps, run_seed

# where results.json / results.png and every run go when --out is not given
DEFAULT_OUT = "outputs/fusion-demo"
# --reward graded: the results (results.json, results.png) here, the runs (models, samples) in RUNS;
# with --quick both in a quick/ folder of each, so a QUICK run never overwrites the full run's results
GRADED_RESULTS = "benchmarks/results/fusion_demo/graded"
GRADED_RUNS = "outputs/fusion-demo-graded"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusion_demo", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one seed, fewer prompts and steps (a few minutes)")
    p.add_argument("--reward", choices=list(REWARDS), default="exact",
                   help="how samples are scored: exact (0/1 verifier, the default) or graded (closeness of "
                        "the final number and true steps, in [0, 1]; 5 seeds)")  # fmt: skip
    p.add_argument("--out", help=f"results.json, results.png and every run (default: {DEFAULT_OUT}; "
                                 f"--reward graded: results in {GRADED_RESULTS}, runs in {GRADED_RUNS}, "
                                 "each in quick/ with --quick)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (graded 0-4; --quick: 0)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=JSON",
                   help="override settings of examples/fusion_demo/config.py, e.g. beta=0.5")  # fmt: skip
    args = p.parse_args(argv)
    cfg = preset(quick=args.quick, reward=args.reward)
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = dataclasses.replace(cfg, **{k: _value(v) for k, v in overrides.items()})
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
    if args.out:
        out = runs = Path(args.out)
    elif cfg.reward == "graded":
        out, runs = Path(GRADED_RESULTS), Path(GRADED_RUNS)
        if args.quick:
            out, runs = out / "quick", runs / "quick"
    else:
        out = runs = Path(DEFAULT_OUT)
    start = time.time()
    # tiny models: more threads only contend with the training subprocesses; this process (scoring,
    # building, evaluation and the in-process jobs) runs with the jobs' thread count
    with torch_threads(cfg.threads):
        per_seed = []
        with tqdm(total=num_steps(cfg) * len(cfg.seeds), unit="step") as bar:
            for seed in cfg.seeds:
                per_seed.append(run_seed(cfg, seed, runs / f"seed{seed}", bar))
    config = {
        **cfg.to_json(),
        "quick": args.quick,
        "runs": str(runs),
        "wall_seconds": round(time.time() - start),
    }
    results = report.collect(per_seed, config, report.machine(cfg.parallel, cfg.threads))
    path = report.write(results, out)
    print(report.table(results))
    print(f"{path} and results.png written in {config['wall_seconds']} s")
    return 0


def _value(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


if __name__ == "__main__":
    sys.exit(main())
