"""The TRL adapter (``wrpo.integrations.trl.WRPOTrainer``) under DeepSpeed ZeRO-3 through accelerate, 2 CPU
processes, logs what 1 process logs: loss, grad_norm, logps/* and rewards/* at steps 1-2 with gradient
accumulation 2, for (a) ``precompute_ref_log_probs=True`` (the reference log-probs computed before
training through TRL's ``prepare_deepspeed`` inference engine over the partitioned policy) and (b) a
reference model passed in (TRL wraps it with ``prepare_deepspeed``: a ZeRO-3 engine of its own).

``tests/distributed/trl_zero3_script.py`` trains both variants in turn; it is launched as a user launches
a TRL script, ``accelerate launch --config_file examples/accelerate/zero3.yaml``, in fp32 (``--mixed_precision
no``, ``bf16=False``), with ``DS_ACCELERATOR=cpu``, and directly with ``python`` for the 1-process run.
The global batch of each step is the same: 1 process x 2 groups x 2 micro-batches, 2 processes x 1 group
x 2 micro-batches. ``logits/*`` are left out: a per-process mean of token logits, averaged over the
processes, is not the mean over all tokens (as in TRL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from log_parity import ACCELERATE, ROOT, assert_logs_match, zero_launch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")
from wrpo.train.tiny import save_tiny_model  # noqa: E402

SCRIPT = ROOT / "tests/distributed/trl_zero3_script.py"
VARIANTS = ["precompute", "ref_model"]
TIMEOUT = 240
BETA = 0.5  # the script's


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    cmd = [sys.executable, str(SCRIPT), str(model_dir), str(out), "2", *VARIANTS]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def zero3(model_dir, tmp_path_factory) -> Path:
    if ACCELERATE is None:
        pytest.skip("accelerate's launcher is not installed")
    out = tmp_path_factory.mktemp("zero3")
    cmd = [
        *zero_launch(),
        str(SCRIPT),
        str(model_dir),
        str(out),
        "1",
        *VARIANTS,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-5000:]
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_trl_zero3_two_processes_match_one(variant, one_process, zero3):
    one = json.loads((one_process / variant / "logs.json").read_text())
    zero = json.loads((zero3 / variant / "logs.json").read_text())
    assert (one["distributed_type"], one["num_processes"]) == ("DistributedType.NO", 1), one

    # DeepSpeed ZeRO-3 trained (not DDP), every parameter held as a shard of 2
    assert (zero["distributed_type"], zero["num_processes"]) == ("DistributedType.DEEPSPEED", 2), zero
    engines = [zero["policy_engine"]]
    if variant == "precompute":
        assert zero["ref_model"] == one["ref_model"] == "NoneType"  # ref_logps read from the data
        engines.append(zero["precompute_engine"])  # computed by TRL's prepare_deepspeed engine
    else:
        assert zero["ref_model"] == "DeepSpeedEngine", zero  # TRL's prepare_deepspeed
        engines.append(zero["ref_engine"])
    for engine in engines:
        assert engine is not None, zero
        assert (engine["zero_stage"], engine["world_size"]) == (3, 2), zero
        assert engine["partitioned"] == engine["zero3_parameters"] > 0, zero

    a_steps, b_steps = zero["steps"], one["steps"]
    assert [e["step"] for e in b_steps] == [1, 2]
    assert abs(b_steps[1]["rewards/margins"]) > 1e-3  # the policy has moved from the reference
    assert_logs_match(a_steps, b_steps, beta=BETA, label=f"TRL {variant}, ZeRO-3 vs 1 process")
