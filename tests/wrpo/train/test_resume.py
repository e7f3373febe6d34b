"""Kill and resume: ``wrpo train`` killed with SIGKILL mid-run, rerun with ``--resume_from_checkpoint
true``, continues from the newest complete checkpoint exactly like an uninterrupted run (losses,
alpha, grad norms, learning rates, final weights); a checkpoint cut off mid-write is never used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.cli_runs import cli, sample_rows
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from wrpo.cli.main import main
from wrpo.train.checkpoints import (
    MARKER,
    CompleteCheckpoints,
    checkpoint_problem,
    is_complete,
    mark_complete,
    newest_complete_checkpoint,
    resolve_resume,
    train_from_checkpoint,
)

ROOT = Path(__file__).resolve().parents[3]
STEPS, SAVE_EVERY, KILL_AT = 12, 3, 6
ROWS = 32  # 8 optimizer steps per epoch (2 micro-batches of 2): the run crosses an epoch boundary
TOL = 1e-6
COMPARED = ("loss", "cur_alpha", "grad_norm", "learning_rate", "rewards/margins", "logps/chosen")


def _flags(out: Path, data: Path, cache: Path) -> list[str]:
    return cli(
        "train --save_strategy steps --logging_steps 1 --eval_rows 0",
        "--report_to none --disable_tqdm true --per_device_train_batch_size 2",
        "--gradient_accumulation_steps 2 --precompute_ref_logps true --seed 7",
        dataset=data,
        output_dir=out,
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        ref_logps_cache=cache,
    )


def _popen(flags: list[str], log: Path) -> subprocess.Popen:
    # one thread each (the two first runs share the cores) and no C++ build inside a timed run
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WRPO_KERNELS_NO_EXT": "1"}
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "wrpo.cli", *flags], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
        )


def _cut_off_copy(src: Path, dst: Path) -> None:
    """``dst``: ``src`` as a save killed mid-write leaves it, its model file half written, no marker."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / MARKER).unlink()
    model = dst / "model.safetensors"
    os.truncate(model, model.stat().st_size // 2)


def _logged(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e for e in history if "loss" in e}


def _step(path) -> int:
    return int(Path(path).name.rsplit("-", 1)[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and, alongside it, the same run killed once checkpoint-6 appears; then
    cut-off checkpoints planted above the newest complete one, and the killed run resumed."""
    root = tmp_path_factory.mktemp("resume")
    data = sample_rows(root / "data.jsonl", ROWS)
    cache, full, killed = root / "cache", root / "full", root / "killed"
    start = time.monotonic()
    p_full = _popen(_flags(full, data, cache), root / "full.log")
    p_kill = _popen(_flags(killed, data, cache), root / "killed.log")
    p_resume = None
    try:
        while not (killed / f"checkpoint-{KILL_AT}").exists():
            assert p_kill.poll() is None, (root / "killed.log").read_text()[-3000:]
            assert time.monotonic() - start < 300, "no checkpoint after 300 s"
            time.sleep(0.002)
        p_kill.send_signal(signal.SIGKILL)  # right away: usually while checkpoint-6 is being written
        assert p_kill.wait() == -signal.SIGKILL
        killed_after = time.monotonic() - start

        resumed_from = newest_complete_checkpoint(killed)
        assert resumed_from is not None
        r = _step(resumed_from)
        assert r in (3, 6, 9), r
        # cut off mid-write: at the next save step (the resumed run saves into it again) and at a
        # step no save reaches; either is higher than any complete checkpoint
        resaved = killed / f"checkpoint-{r + SAVE_EVERY}"
        _cut_off_copy(Path(resumed_from), resaved)
        _cut_off_copy(Path(resumed_from), killed / "checkpoint-11")
        before = {
            "transformers_pick": get_last_checkpoint(str(killed)),
            "resolved": resolve_resume("true", killed),
            "mtime": (Path(resumed_from) / "model.safetensors").stat().st_mtime_ns,
        }
        # (the uninterrupted run may still be going: the two share the cores)
        resume_flags = [*_flags(killed, data, cache), "--resume_from_checkpoint", "true"]
        p_resume = _popen(resume_flags, root / "resumed.log")
        assert p_resume.wait(timeout=300) == 0, (root / "resumed.log").read_text()[-3000:]
        assert p_full.wait(timeout=300) == 0, (root / "full.log").read_text()[-3000:]
    finally:
        for p in (p_full, p_kill, p_resume):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    seconds = {"killed after": killed_after, "all": time.monotonic() - start}
    return SimpleNamespace(
        full=full,
        killed=killed,
        r=r,
        resumed_from=Path(resumed_from),
        resaved=resaved,
        before=before,
        seconds=seconds,
        log=(root / "resumed.log").read_text(),
    )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_resumed_run_logs_what_the_uninterrupted_run_logs(runs):
    full, resumed = _logged(runs.full), _logged(runs.killed)
    assert sorted(resumed) == sorted(full) == list(range(1, STEPS + 1))
    worst = {}
    for step in range(runs.r + 1, STEPS + 1):
        for key in COMPARED:
            worst[key] = max(worst.get(key, 0.0), _rel(resumed[step][key], full[step][key]))
            assert resumed[step][key] == pytest.approx(full[step][key], rel=TOL), (step, key)
    print(f"resumed from step {runs.r}; max relative differences {worst}; runs took {runs.seconds} s")


def _max_rel_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-12)).item() for k in wb)


def test_resumed_run_ends_with_the_uninterrupted_weights(runs):
    assert _max_rel_weight_diff(runs.killed, runs.full) <= TOL
    # the cut-off checkpoint at the next save step was written again, whole, and marked
    assert is_complete(runs.resaved)
    assert _max_rel_weight_diff(runs.resaved, runs.full / runs.resaved.name) <= TOL


def test_resume_starts_from_the_newest_complete_checkpoint(runs):
    # transformers alone would have picked the highest directory, cut off mid-write
    assert runs.before["transformers_pick"] == str(runs.killed / "checkpoint-11")
    assert runs.before["resolved"] == str(runs.resumed_from)
    # resumed, not restarted: the checkpoint resumed from was not saved again
    assert (runs.resumed_from / "model.safetensors").stat().st_mtime_ns == runs.before["mtime"]
    assert "Traceback" not in runs.log
    assert not is_complete(runs.killed / "checkpoint-11")
    assert newest_complete_checkpoint(runs.killed) == str(runs.killed / f"checkpoint-{STEPS}")


def test_explicit_path_to_a_cut_off_checkpoint_is_refused(runs, capsys):
    bad = runs.killed / "checkpoint-11"
    code = main(["train", "--output_dir", str(runs.killed), "--resume_from_checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and "incomplete checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---- resolve_resume and the marker, without a training run ----------------------------------------


def _fake_checkpoint(path: Path, step: int, *, marked: bool = True) -> Path:
    """A small checkpoint with the files transformers writes, all whole."""
    path.mkdir(parents=True)
    save_file({"w": torch.arange(6.0)}, path / "model.safetensors")
    torch.save({"state": {}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        mark_complete(path, step)
    return path


@pytest.mark.parametrize("value", [None, False, "false", "False", "no", "0", "none", ""])
def test_resolve_resume_off(tmp_path, value):
    _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    assert resolve_resume(value, tmp_path) is None


@pytest.mark.parametrize("value", [True, "true", "True", "1", "yes", "last"])
def test_resolve_resume_last_skips_unmarked_and_damaged(tmp_path, value):
    _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    _fake_checkpoint(tmp_path / "checkpoint-6", 6, marked=False)  # cut off before its marker
    damaged = _fake_checkpoint(tmp_path / "checkpoint-8", 8)  # marked, then a file changed size
    with open(damaged / "optimizer.pt", "ab") as fh:
        fh.write(b"x")
    (tmp_path / "checkpoint-10").mkdir()  # the save had only just begun
    (tmp_path / "checkpoint-x").mkdir()
    assert resolve_resume(value, tmp_path) == str(tmp_path / "checkpoint-4")
    assert "optimizer.pt" in checkpoint_problem(damaged)


def test_resolve_resume_last_without_checkpoint_starts_from_scratch(tmp_path, caplog):
    (tmp_path / "checkpoint-3").mkdir()
    assert resolve_resume("true", tmp_path) is None
    assert "from scratch" in caplog.text and "checkpoint-3" in caplog.text
    assert resolve_resume("true", tmp_path / "not-there") is None


def test_resolve_resume_explicit_paths(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    assert resolve_resume(str(good), tmp_path) == str(good)
    # not written by wrpo but whole: accepted, with a warning
    foreign = _fake_checkpoint(tmp_path / "checkpoint-4", 4, marked=False)
    assert resolve_resume(str(foreign), tmp_path) == str(foreign)
    assert MARKER in caplog.text
    # unmarked and truncated, unmarked and without optimizer, marked and damaged, missing
    cut = _fake_checkpoint(tmp_path / "checkpoint-6", 6, marked=False)
    os.truncate(cut / "model.safetensors", 20)
    partial = _fake_checkpoint(tmp_path / "checkpoint-8", 8, marked=False)
    (partial / "optimizer.pt").unlink()
    damaged = _fake_checkpoint(tmp_path / "checkpoint-10", 10)
    os.truncate(damaged / "model.safetensors", 20)
    for path, why in (
        (cut, "model.safetensors is truncated"),
        (partial, "no optimizer.pt"),
        (damaged, "model.safetensors has 20 bytes"),
    ):
        with pytest.raises(ValueError, match="incomplete checkpoint") as err:
            resolve_resume(str(path), tmp_path)
        assert str(path) in str(err.value) and why in str(err.value)
        assert f"the newest complete checkpoint there is {good}" in str(err.value)
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)


def test_marker_is_removed_before_a_save_and_written_after_it(tmp_path):
    callback = CompleteCheckpoints()
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, save_total_limit=None)
    state, control = TrainerState(), TrainerControl()
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-3", 3)
    state.global_step = 3
    for event in (callback.on_step_end, callback.on_epoch_end):
        mark_complete(ckpt, 3)
        control.should_save = False
        event(args, state, control)
        assert is_complete(ckpt)  # no save coming: left alone
        control.should_save = True
        event(SimpleNamespace(output_dir=str(tmp_path), should_save=False), state, control)
        assert is_complete(ckpt)  # not the process that writes checkpoints
        event(args, state, control)
        assert not (ckpt / MARKER).exists()  # a save into it is coming
    # save_strategy "best": decided after an evaluation during training
    best = SimpleNamespace(output_dir=str(tmp_path), should_save=True, save_strategy="best")
    mark_complete(ckpt, 3)
    callback.on_evaluate(best, state, control)
    assert is_complete(ckpt)  # an evaluation outside training
    callback.on_train_begin(best, state, control)
    callback.on_evaluate(SimpleNamespace(**{**vars(best), "save_strategy": "steps"}), state, control)
    assert is_complete(ckpt)
    callback.on_evaluate(best, state, control)
    assert not (ckpt / MARKER).exists()
    callback.on_save(args, state, control)
    assert is_complete(ckpt)
    record = json.loads((ckpt / MARKER).read_text())
    assert record["step"] == 3 and record["files"]["model.safetensors"] > 0
    assert not list(ckpt.glob(f".{MARKER}*"))


class _Killed(Exception):
    pass


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, labels=None):
        return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_a_resave_cut_off_midway_does_not_look_complete(tmp_path, strategy):
    """transformers' real save order: a complete checkpoint-4 left by an earlier run loses its marker
    before the new save into it starts, so a kill during that save leaves it unmarked."""
    old = _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    rows = [{"x": torch.randn(2), "labels": torch.tensor(0.0)} for _ in range(4)]
    kw = {"save_steps": 2, "max_steps": 4} if strategy == "steps" else {"num_train_epochs": 2}
    args = TrainingArguments(
        str(tmp_path),
        save_strategy=strategy,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        **kw,
    )
    trainer = Trainer(_Linear(), args, train_dataset=rows, callbacks=[CompleteCheckpoints()])
    marked_at_save = {}
    real = trainer._save_rng_state

    def save_rng_state(output_dir):
        step = trainer.state.global_step
        marked_at_save[step] = (Path(output_dir) / MARKER).exists()
        if step == 4:
            raise _Killed  # the process dies mid-save
        real(output_dir)

    trainer._save_rng_state = save_rng_state
    with pytest.raises(_Killed):
        trainer.train()
    assert marked_at_save == {2: False, 4: False}
    assert is_complete(tmp_path / "checkpoint-2") and not is_complete(old)
    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert resolve_resume("last", tmp_path) == str(tmp_path / "checkpoint-2")


def _linear_trainer(out: Path, **kw) -> Trainer:
    rows = [{"x": torch.randn(2), "labels": torch.tensor(0.0)} for _ in range(4)]
    args = TrainingArguments(
        str(out),
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        seed=3,
        **kw,
    )
    return Trainer(_Linear(), args, train_dataset=rows, callbacks=[CompleteCheckpoints()])


def test_resuming_from_the_last_checkpoint_trains_nothing_more(tmp_path):
    """max_steps 3 at 2 steps per epoch: plain ``train`` resumed at step 3 would run a step 4."""
    kw = {"max_steps": 3, "save_strategy": "steps", "save_steps": 3}
    first = _linear_trainer(tmp_path, **kw)
    train_from_checkpoint(first, resolve_resume("true", tmp_path))  # nothing yet: from scratch
    last = resolve_resume("true", tmp_path)
    assert last == str(tmp_path / "checkpoint-3")
    again = _linear_trainer(tmp_path, **kw)
    assert train_from_checkpoint(again, last) is None
    assert again.state.global_step == 3 and again.state.max_steps == 3
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-3"]
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # a longer run resumes from there as usual
    longer = _linear_trainer(tmp_path, **{**kw, "max_steps": 4})
    train_from_checkpoint(longer, last)
    assert longer.state.global_step == 4 and is_complete(tmp_path / "checkpoint-4")


# ---- save_total_limit: the last complete checkpoint survives a kill at any moment -------------------

# Put on PYTHONPATH of the killed run: kills the process with SIGKILL right after transformers'
# ``Trainer._save_checkpoint`` returned at step $WRPO_TEST_KILL_AFTER_SAVE (the files written and, in
# transformers, the older checkpoints rotated away), before the ``on_save`` callbacks mark it complete;
# with $WRPO_TEST_RECORD_RESUME, writes the checkpoint ``Trainer.train`` resumes from into that file.
_KILL_HOOK = """
import os
if os.environ.get("WRPO_TEST_KILL_AFTER_SAVE"):
    import signal
    from transformers import Trainer

    _save_checkpoint = Trainer._save_checkpoint

    def _save_then_die(self, model, trial):
        _save_checkpoint(self, model, trial)
        if self.state.global_step == int(os.environ["WRPO_TEST_KILL_AFTER_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_checkpoint = _save_then_die
if os.environ.get("WRPO_TEST_RECORD_RESUME"):
    from transformers import Trainer

    _train = Trainer.train

    def _recorded_train(self, resume_from_checkpoint=None, *args, **kwargs):
        with open(os.environ["WRPO_TEST_RECORD_RESUME"], "w") as fh:
            fh.write(str(resume_from_checkpoint))
        return _train(self, resume_from_checkpoint, *args, **kwargs)

    Trainer.train = _recorded_train
"""


def test_save_total_limit_never_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    """``--save_steps 1 --save_total_limit 1``, killed between the save of checkpoint-3 and its
    marker: the complete checkpoint-2 is still there and the rerun resumes from it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_HOOK)
    data = sample_rows(tmp_path / "data.jsonl", 8)
    out = tmp_path / "out"
    flags = cli(
        "train --max_steps 4 --save_strategy steps --save_steps 1",
        "--save_total_limit 1 --logging_steps 1 --eval_rows 0 --report_to none",
        "--disable_tqdm true --per_device_train_batch_size 2 --seed 7",
        dataset=data,
        output_dir=out,
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WRPO_TEST_KILL_AFTER_SAVE", "3")
    killed = _popen(flags, tmp_path / "killed.log")
    assert killed.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not is_complete(out / "checkpoint-3")  # killed before its marker
    assert newest_complete_checkpoint(out) == str(out / "checkpoint-2")

    monkeypatch.delenv("WRPO_TEST_KILL_AFTER_SAVE")
    monkeypatch.setenv("WRPO_TEST_RECORD_RESUME", str(tmp_path / "resumed_from"))
    resumed = _popen([*flags, "--resume_from_checkpoint", "true"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged == [1, 2, 3, 4]
    assert (tmp_path / "resumed_from").read_text() == str(out / "checkpoint-2")
    # the limit still holds once the new checkpoint is complete
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert is_complete(out / "checkpoint-4")


def test_rotation_keeps_the_newest_complete_checkpoint(tmp_path):
    import transformers.trainer

    from wrpo.train.checkpoints import keeping_the_newest_complete, rotate_checkpoints

    original = transformers.trainer.rotate_checkpoints
    with keeping_the_newest_complete():  # what WRPOTrainer._save_checkpoint runs under
        assert transformers.trainer.rotate_checkpoints is rotate_checkpoints
    assert transformers.trainer.rotate_checkpoints is original  # other Trainers keep transformers' own
    _fake_checkpoint(tmp_path / "checkpoint-1", 1)
    _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    _fake_checkpoint(tmp_path / "checkpoint-3", 3, marked=False)  # just saved, not marked yet
    rotate_checkpoints(str(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    mark_complete(tmp_path / "checkpoint-3", 3)
    rotate_checkpoints(str(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    # no markers (plain transformers): transformers' own rule, the most recent and the best kept
    plain = tmp_path / "plain"
    for step in (1, 2, 3, 4):
        _fake_checkpoint(plain / f"checkpoint-{step}", step, marked=False)
    rotate_checkpoints(str(plain), 1, best_model_checkpoint=str(plain / "checkpoint-2"))
    assert sorted(p.name for p in plain.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_resume_says_where_it_resumes_from_and_what_it_skipped(tmp_path, caplog):
    _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    _fake_checkpoint(tmp_path / "checkpoint-4", 4, marked=False)  # cut off by a kill
    with caplog.at_level("WARNING", logger="wrpo.train.checkpoints"):
        assert resolve_resume("true", tmp_path) == str(tmp_path / "checkpoint-2")
    assert f"resuming from {tmp_path / 'checkpoint-2'} (skipped, incomplete: checkpoint-4)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wrpo.train.checkpoints"):
        assert resolve_resume("true", tmp_path / "empty") is None
    assert "no complete checkpoint in" in caplog.text and "training starts from scratch" in caplog.text
