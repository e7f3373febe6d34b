"""Two CPU processes (gloo DDP, accelerate launch --multi_gpu) equal one process on the same global batch."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_step import build_model, global_batch, step_loss
from helpers.cli_runs import QUIET, cli, sample_rows

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def launch_two(*args) -> list[str]:
    """``accelerate launch`` of 2 CPU processes on a free rendezvous port (not the default 29500,
    which another test run on the same machine may hold)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu starts the processes through torchrun; on a machine without GPUs they use gloo on the CPU
    return [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *args,
    ]


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_process_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    script = Path(__file__).with_name("ddp_step.py")
    cmd = launch_two(str(script), str(out))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(out)
    assert ddp["world"] == 2

    model = build_model()
    loss = step_loss(model, global_batch())
    loss.backward()
    assert torch.allclose(ddp["loss"], loss.detach(), rtol=1e-12)
    for name, p in model.named_parameters():
        assert torch.allclose(ddp["grads"][name], p.grad, rtol=1e-9, atol=1e-12), name
    assert max(g.abs().max() for g in ddp["grads"].values()) > 0


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_trainer_metrics_are_averaged_over_processes(tmp_path):
    """`wrpo train` on 2 processes x 2 groups, and on 2 processes x 1 group x 2 accumulation steps,
    logs the loss, grad_norm and metrics of 1 process x 4 groups.

    The data holds exactly 4 rows, so every step's global batch is all of them whatever the order;
    step 2 compares metrics after one identical (DDP-averaged) update, when rewards are no longer 0.
    """
    data = sample_rows(tmp_path / "four.jsonl", 4)
    common = cli(
        "train --max_steps 2 --logging_steps 1",
        QUIET,
        "--beta 0.1 --alpha 0.1 --alpha_schedule constant --learning_rate 1e-3",
        "--warmup_steps 0 --disable_tqdm true",
        dataset=data,
    )
    launch = launch_two("-m", "wrpo.cli")
    runs = {
        "two": [*launch, *common, "--per_device_train_batch_size", "2"],
        "two_accumulating": [
            *launch,
            *common,
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "2",
        ],
        "one": [sys.executable, "-m", "wrpo.cli", *common, "--per_device_train_batch_size", "4"],
    }
    logs = {}
    for name, cmd in runs.items():
        run = subprocess.run(
            [*cmd, "--output_dir", str(tmp_path / name)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        logs[name] = [e for e in state["log_history"] if "loss" in e and "train_runtime" not in e]
    one = logs["one"]
    assert [e["step"] for e in one] == [1, 2]
    assert abs(one[1]["rewards/margins"]) > 1e-4  # the policy has moved from the reference
    for run in ("two", "two_accumulating"):
        for a, b in zip(logs[run], one, strict=True):
            for name in ("loss", "grad_norm"):
                assert a[name] == pytest.approx(b[name], rel=1e-5), (run, a["step"], name)
        a, b = logs[run][1], one[1]
        for name in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "cur_alpha",
        ):
            assert a[name] == pytest.approx(b[name], rel=1e-3, abs=1e-6), (run, name)
