"""`wrpo train` under DeepSpeed ZeRO-3 / ZeRO-2 through accelerate, 2 CPU processes, logs what 1 process
logs: loss, grad_norm, logps/* and rewards/* at steps 1-2 with gradient accumulation 2.

Launched as a user launches it, ``accelerate launch --config_file examples/accelerate/zero3.yaml``, in
fp32 (``--mixed_precision no``: ZeRO-3 refuses fp64, a CPU gains nothing from bf16), with
``DS_ACCELERATOR=cpu`` and ``tests/ds_cpu_launch.py`` in place of ``-m wrpo.cli``: it only skips the
JIT build of an inference op (~1 minute) and records the DeepSpeed engine, then runs ``wrpo.cli.main``.
The global batch of each step is the same: 1 process x 2 groups x 2 micro-batches, 2 processes x 1
group x 2 micro-batches (the distributed sampler deals the one shuffled order out to the processes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))
COMMON = ["train", "--max_steps", "2", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
          "--learning_rate", "1e-3", "--warmup_steps", "0", "--report_to", "none", "--eval_rows", "0",
          "--seed", "3", "--beta", "0.1", "--disable_tqdm", "true"]  # fmt: skip
# warmup 0: the first update moves the policy, so step 2's rewards are not all 0
TIMEOUT = 240
BETA = 0.1  # the bundled tiny default's, given explicitly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_steps(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e and "train_runtime" not in e]


def compared(entry: dict) -> dict:
    return {
        k: v for k, v in entry.items() if k in ("loss", "grad_norm") or k.startswith(("logps/", "rewards/"))
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one")
    cmd = [
        sys.executable,
        "-m",
        "wrpo.cli",
        *COMMON,
        "--per_device_train_batch_size",
        "2",
        "--output_dir",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return logged_steps(out)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
@pytest.mark.parametrize("stage", [3, 2])
def test_zero_two_processes_match_one(stage, one_process, tmp_path):
    out, probe = tmp_path / "out", tmp_path / "engine.json"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / f"examples/accelerate/zero{stage}.yaml"),
           "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(ROOT / "tests/ds_cpu_launch.py"), *COMMON, "--per_device_train_batch_size", "1",
           "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WRPO_DS_PROBE": str(probe)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-5000:]

    engine = json.loads(probe.read_text())  # DeepSpeed trained, not DDP
    assert engine["distributed_type"] == "DistributedType.DEEPSPEED", engine
    assert (engine["zero_stage"], engine["world_size"]) == (stage, 2), engine
    # ZeRO-3 partitions the parameters (the default persistence threshold keeps the smallest whole)
    assert (engine["partitioned"] > 0) == (stage == 3), engine

    zero, one = logged_steps(out), one_process
    assert [e["step"] for e in one] == [e["step"] for e in zero] == [1, 2]
    assert abs(one[1]["rewards/margins"]) > 1e-6  # the policy has moved from the reference
    worst, failed = {}, []
    for a, b in zip(zero, one, strict=True):
        step, a, b = b["step"], compared(a), compared(b)
        assert a.keys() == b.keys() and len(a) > 10
        # rewards are beta (logp - ref logp), differences of fp32 sums of ~100: they are exact to
        # beta ulp(logp) (7.6e-7 here), not 1e-5 relative; 2 such ulps allowed (observed: 0.5)
        ulp = math.ulp(max(abs(v) for k, v in b.items() if k.startswith("logps/"))) * 2**29  # fp32's
        for name in a:
            rel = abs(a[name] - b[name]) / max(abs(b[name]), 1e-30) if a[name] != b[name] else 0.0
            worst[name] = max(worst.get(name, 0.0), rel)
            tolerance = 2 * BETA * ulp if name.startswith("rewards/") else 1e-9
            if a[name] != pytest.approx(b[name], rel=1e-5, abs=tolerance):
                failed.append((step, name, a[name], b[name]))
    print(f"ZeRO-{stage} vs 1 process, max relative difference:", json.dumps(worst, indent=1))
    assert not failed, failed
