"""Two CPU processes (gloo DDP, accelerate launch --multi_gpu) equal one process on the same global batch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_step import build_model, global_batch, step_loss

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_process_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    script = Path(__file__).with_name("ddp_step.py")
    # --multi_gpu starts the processes through torchrun; on a machine without GPUs they use gloo on the CPU
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(out)
    assert ddp["world"] == 2

    model = build_model()
    loss = step_loss(model, model, global_batch())
    loss.backward()
    assert torch.allclose(ddp["loss"], loss.detach(), rtol=1e-12)
    for name, p in model.named_parameters():
        assert torch.allclose(ddp["grads"][name], p.grad, rtol=1e-9, atol=1e-12), name
    assert max(g.abs().max() for g in ddp["grads"].values()) > 0
