"""Run ``wrpo ...`` commands as subprocesses, a few at a time, one CPU thread each, logged to files
(``parallel=1``: one after the other in this process, which saves each start-up)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true"}  # fmt: skip


def run_wrpo(jobs: dict[str, list[str]], log_dir: Path, bar: tqdm, *, parallel: int = 2) -> None:
    """Runs ``wrpo ARGS`` for each {name: ARGS}, ``parallel`` at once; output goes to ``log_dir/NAME.log``.

    Raises RuntimeError with the log's tail when a command fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if parallel == 1:
        return _in_process(jobs, log_dir, bar)
    env = {**os.environ, **ENV}
    pending, running = list(jobs.items()), []
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            log = (log_dir / f"{name}.log").open("w")
            cmd = [sys.executable, "-m", "wrpo.cli", *args]
            log.write(" ".join(["wrpo", *args]) + "\n")
            log.flush()
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            bar.set_postfix_str(", ".join(n for n, _, _ in running))
        time.sleep(0.2)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            bar.update()
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.kill()
                tail = "".join((log_dir / f"{name}.log").read_text().splitlines(True)[-15:])
                raise RuntimeError(
                    f"wrpo {name} failed (exit {proc.returncode}), {log_dir / name}.log:\n{tail}"
                )


def _in_process(jobs: dict[str, list[str]], log_dir: Path, bar: tqdm) -> None:
    from ..cli import main

    for name, args in jobs.items():
        bar.set_postfix_str(name)
        path = log_dir / f"{name}.log"
        with path.open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            print(" ".join(["wrpo", *args]), flush=True)
            code = main(args)
        bar.update()
        if code != 0:
            tail = "".join(path.read_text().splitlines(True)[-15:])
            raise RuntimeError(f"wrpo {name} failed (exit {code}), {path}:\n{tail}")
