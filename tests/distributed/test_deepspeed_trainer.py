"""`wrpo train` under DeepSpeed ZeRO-3 / ZeRO-2 and `wrpo sft` under ZeRO-3, through accelerate, 2 CPU
processes, log what 1 process logs: loss, grad_norm, logps/* and rewards/* (sft: loss, grad_norm) at
steps 1-2 with gradient accumulation 2.

Launched as a user launches it, ``accelerate launch --config_file examples/accelerate/zero3.yaml``, in
fp32 (``--mixed_precision no``: ZeRO-3 refuses fp64, a CPU gains nothing from bf16), with
``DS_ACCELERATOR=cpu`` and ``tests/distributed/ds_cpu_launch.py`` in place of ``-m wrpo.cli``: it only
skips the JIT build of an inference op (~1 minute) and records the DeepSpeed engine, then runs
``wrpo.cli.main.main``.
The global batch of each step is the same: 1 process x 2 groups x 2 micro-batches, 2 processes x 1
group x 2 micro-batches (the distributed sampler deals the one shuffled order out to the processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli_runs import QUIET, cli
from log_parity import ACCELERATE, ROOT, assert_logs_match, zero_launch

pytest.importorskip("deepspeed")
COMMON = cli(
    "--max_steps 2 --gradient_accumulation_steps 2 --logging_steps 1",
    "--learning_rate 1e-3 --warmup_steps 0",
    QUIET,
    "--seed 3 --beta 0.1 --disable_tqdm true",
)
# warmup 0: the first update moves the policy, so step 2's rewards are not all 0
TIMEOUT = 240
BETA = 0.1  # the bundled tiny default's, given explicitly


def logged_steps(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e and "train_runtime" not in e]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """command -> the logged steps of 1 process (each run once)."""
    runs = {}

    def logged(command: str) -> list[dict]:
        if command not in runs:
            out = tmp_path_factory.mktemp(f"one-{command}")
            cmd = [
                sys.executable,
                "-m",
                "wrpo.cli",
                command,
                *COMMON,
                "--per_device_train_batch_size",
                "2",
                "--output_dir",
                str(out),
            ]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
            assert run.returncode == 0, run.stderr[-3000:]
            runs[command] = logged_steps(out)
        return runs[command]

    return logged


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
@pytest.mark.parametrize(("command", "stage"), [("train", 3), ("train", 2), ("sft", 3)])
def test_zero_two_processes_match_one(command, stage, one_process, tmp_path):
    out, probe = tmp_path / "out", tmp_path / "engine.json"
    cmd = [
        *zero_launch(stage),
        str(ROOT / "tests/distributed/ds_cpu_launch.py"),
        command,
        *COMMON,
        "--per_device_train_batch_size",
        "1",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WRPO_DS_PROBE": str(probe)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-5000:]

    engine = json.loads(probe.read_text())  # DeepSpeed trained, not DDP
    assert engine["distributed_type"] == "DistributedType.DEEPSPEED", engine
    assert (engine["zero_stage"], engine["world_size"]) == (stage, 2), engine
    # ZeRO-3 partitions the parameters (the default persistence threshold keeps the smallest whole)
    assert (engine["partitioned"] > 0) == (stage == 3), engine

    zero, one = logged_steps(out), one_process(command)
    assert [e["step"] for e in one] == [1, 2]
    moved = "rewards/margins" if command == "train" else "loss"  # the policy has moved at step 2
    assert abs(one[1][moved] - one[0][moved] if command == "sft" else one[1][moved]) > 1e-6
    assert_logs_match(zero, one, beta=BETA, label=f"{command}, ZeRO-{stage} vs 1 process")
