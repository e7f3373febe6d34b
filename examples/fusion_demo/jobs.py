"""Run ``wrpo ...`` commands as subprocesses, a few at a time, logged to files (``parallel=1``: one after
the other in this process, which saves each start-up). Every command runs with the same number of torch
threads (``threads``, 1 by default) whichever way it runs: OMP/MKL variables and ``torch.set_num_threads``
in a subprocess, ``torch.set_num_threads`` for the command's duration in this process. Each log's second
line records the thread count the command ran with."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "WANDB_DISABLED": "true"}  # fmt: skip
# a subprocess: set torch's threads before the command runs, and say so in its log
LAUNCH = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "print(f'torch threads: {torch.get_num_threads()}', flush=True); "
    "sys.argv = ['wrpo', *sys.argv[2:]]; from wrpo.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables that give a process ``threads`` OpenMP / MKL threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@contextlib.contextmanager
def torch_threads(threads: int):
    """``torch.set_num_threads(threads)`` inside the block, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_wrpo(
    jobs: dict[str, list[str]], log_dir: Path, bar: tqdm, *, parallel: int = 2, threads: int = 1
) -> None:
    """Runs ``wrpo ARGS`` for each {name: ARGS}, ``parallel`` at once, each with ``threads`` torch threads;
    output goes to ``log_dir/NAME.log``.

    Raises RuntimeError with the log's tail when a command fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if parallel == 1:
        return _in_process(jobs, log_dir, bar, threads)
    env = {**os.environ, **ENV, **thread_env(threads)}
    pending, running = list(jobs.items()), []
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            log = (log_dir / f"{name}.log").open("w")
            cmd = [sys.executable, "-c", LAUNCH, str(threads), *args]
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


def _in_process(jobs: dict[str, list[str]], log_dir: Path, bar: tqdm, threads: int) -> None:
    from wrpo.cli.main import main

    for name, args in jobs.items():
        bar.set_postfix_str(name)
        path = log_dir / f"{name}.log"
        with (
            path.open("w") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
            torch_threads(threads),
        ):
            print(" ".join(["wrpo", *args]), flush=True)
            print(f"torch threads: {torch.get_num_threads()}", flush=True)
            code = main(args)
        bar.update()
        if code != 0:
            tail = "".join(path.read_text().splitlines(True)[-15:])
            raise RuntimeError(f"wrpo {name} failed (exit {code}), {path}:\n{tail}")
