"""``python -m wrpo.fusion_demo [--quick] [--out DIR] [--seeds S ...]``: the whole demo, then the table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import report
from .config import FULL, QUICK
from .pipeline import num_steps, run_seed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wrpo.fusion_demo", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one seed, fewer prompts and steps (a few minutes)")
    p.add_argument("--out", default="outputs/fusion-demo", help="results.json, results.png and every run")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=JSON",
                   help="override settings of wrpo/fusion_demo/config.py, e.g. beta=0.5")  # fmt: skip
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = dataclasses.replace(cfg, **{k: _value(v) for k, v in overrides.items()})
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
    out = Path(args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend with the training subprocesses
    start = time.time()
    try:
        per_seed = []
        with tqdm(total=num_steps(cfg) * len(cfg.seeds), unit="step") as bar:
            for seed in cfg.seeds:
                per_seed.append(run_seed(cfg, seed, out / f"seed{seed}", bar))
    finally:
        torch.set_num_threads(threads)
    config = {**cfg.to_json(), "quick": args.quick, "wall_seconds": round(time.time() - start)}
    results = report.collect(per_seed, config)
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
