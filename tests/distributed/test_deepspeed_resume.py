"""Kill and resume under DeepSpeed ZeRO-3: ``wrpo train`` on 2 CPU processes (accelerate launch, as in
test_deepspeed_trainer.py) is killed with SIGKILL, the launcher and both ranks, right after step 3's
update (checkpoint-2 saved and marked, checkpoint-4 not begun), then rerun with
``--resume_from_checkpoint true``: it resumes from checkpoint-2, whose marker records DeepSpeed's layout
(``global_step2/zero_pp_rank_{0,1}_mp_rank_00_{model,optim}_states.pt``, ``latest``, one RNG state per
rank), and logs at steps 3-4 what an uninterrupted 2-process ZeRO-3 run logs, and ends with its weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.cli_runs import cli
from log_parity import ACCELERATE, ROOT, zero_launch

pytest.importorskip("deepspeed")
from safetensors.torch import load_file  # noqa: E402

from wrpo.train.checkpoints import MARKER, checkpoint_problem, is_complete, newest_complete_checkpoint  # noqa: E402

KILL_AT, STEPS = 3, 4
TOL = 1e-6
COMPARED = ("loss", "grad_norm", "learning_rate", "cur_alpha", "rewards/margins", "logps/chosen")
TIMEOUT = 180

# On PYTHONPATH of the killed run: once every process has finished optimizer step $WRPO_TEST_KILL_AT
# (Trainer._maybe_log_save_evaluate runs right after each update, before that step's save), rank 0
# SIGKILLs the launcher (the ranks' parent; torch's elastic agent puts each rank in a process group of
# its own), then every rank SIGKILLs itself: all of the job dies by SIGKILL, nothing is cleaned up.
# With $WRPO_TEST_RECORD_RESUME, each rank writes the checkpoint Trainer.train resumes from into
# that file + its rank.
_HOOK = """
import os
if os.environ.get("WRPO_TEST_KILL_AT") or os.environ.get("WRPO_TEST_RECORD_RESUME"):
    from transformers import Trainer
if os.environ.get("WRPO_TEST_KILL_AT"):
    import signal

    _mlse = Trainer._maybe_log_save_evaluate

    def _die_after_update(self, *args, **kwargs):
        if self.state.global_step == int(os.environ["WRPO_TEST_KILL_AT"]):
            import torch.distributed as dist

            dist.barrier()
            if dist.get_rank() == 0:
                os.kill(os.getppid(), signal.SIGKILL)  # the launcher first: it would SIGTERM the ranks
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        return _mlse(self, *args, **kwargs)

    Trainer._maybe_log_save_evaluate = _die_after_update
if os.environ.get("WRPO_TEST_RECORD_RESUME"):
    _train = Trainer.train

    def _recorded_train(self, resume_from_checkpoint=None, *args, **kwargs):
        path = os.environ["WRPO_TEST_RECORD_RESUME"] + os.environ.get("RANK", "?")
        with open(path, "w") as fh:
            fh.write(str(resume_from_checkpoint))
        return _train(self, resume_from_checkpoint, *args, **kwargs)

    Trainer.train = _recorded_train
"""


def _launch(out: Path, log: Path, hook: Path, extra: list[str] = (), **env) -> subprocess.Popen:
    cmd = [
        *zero_launch(),
        str(ROOT / "tests/distributed/ds_cpu_launch.py"),
        *cli(
            "train --save_strategy steps --save_steps 2 --logging_steps 1",
            "--learning_rate 1e-3 --warmup_steps 0 --eval_rows 0 --seed 3",
            "--report_to none --disable_tqdm true --per_device_train_batch_size 1",
            "--gradient_accumulation_steps 2",
            max_steps=STEPS,
            output_dir=out,
        ),
        *extra,
    ]
    path = os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}
    with open(log, "w") as fh:  # a session of its own: pytest is never in a killed group
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait(p: subprocess.Popen, log: Path) -> int:
    try:
        return p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.terminate()  # the launcher terminates the ranks (each in a process group of its own)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        raise AssertionError(f"no end after {TIMEOUT} s: {log.read_text()[-3000:]}") from None


def _logged(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e for e in history if "loss" in e and "train_runtime" not in e}


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_zero3_killed_and_resumed_logs_what_the_uninterrupted_run_logs(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    full, killed = tmp_path / "full", tmp_path / "killed"

    p = _launch(full, tmp_path / "full.log", hook)
    assert _wait(p, tmp_path / "full.log") == 0, (tmp_path / "full.log").read_text()[-5000:]

    p = _launch(killed, tmp_path / "killed.log", hook, WRPO_TEST_KILL_AT=str(KILL_AT))
    assert _wait(p, tmp_path / "killed.log") == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-5000:]
    ckpt = killed / "checkpoint-2"
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (killed / "trainer_state.json").exists()  # killed mid-run, not at its end
    # the marker covers DeepSpeed's layout: both ranks' partitions, written before rank 0 marked
    assert checkpoint_problem(ckpt) is None
    recorded = json.loads((ckpt / MARKER).read_text())["files"]
    for rank in (0, 1):
        for kind in ("model", "optim"):
            name = f"global_step2/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
            assert recorded.get(name, 0) > 0, (name, sorted(recorded))
        assert recorded.get(f"rng_state_{rank}.pth", 0) > 0
    assert (ckpt / "latest").read_text().strip() == "global_step2" and "latest" in recorded
    assert newest_complete_checkpoint(killed) == str(ckpt)
    mtimes = {name: (ckpt / name).stat().st_mtime_ns for name in recorded}

    record = tmp_path / "resumed_from"
    p = _launch(
        killed,
        tmp_path / "resumed.log",
        hook,
        ["--resume_from_checkpoint", "true"],
        WRPO_TEST_RECORD_RESUME=str(record),
    )
    assert _wait(p, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()[-5000:]
    assert "Traceback" not in (tmp_path / "resumed.log").read_text()
    for rank in (0, 1):
        assert Path(f"{record}{rank}").read_text() == str(ckpt), rank
    # resumed, not restarted: checkpoint-2 was not saved again
    assert {name: (ckpt / name).stat().st_mtime_ns for name in recorded} == mtimes
    assert is_complete(ckpt) and is_complete(killed / "checkpoint-4")
    assert newest_complete_checkpoint(killed) == str(killed / "checkpoint-4")

    a, b = _logged(killed), _logged(full)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    worst = {}
    for step in (3, 4):
        for key in COMPARED:
            x, y = a[step][key], b[step][key]
            worst[key] = max(worst.get(key, 0.0), abs(x - y) / max(abs(y), 1e-12))
            assert x == pytest.approx(y, rel=TOL), (step, key, x, y)
    wa, wb = load_file(killed / "model.safetensors"), load_file(full / "model.safetensors")
    assert wa.keys() == wb.keys()
    weights = max(((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-12)).item() for k in wb)
    assert weights <= TOL
    print(
        f"ZeRO-3 resumed from checkpoint-2 vs uninterrupted, steps 3-4, max relative differences {worst}; "
        f"final weights {weights}"
    )
