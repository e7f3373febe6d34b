"""Checkpoints that are safe to resume from after a kill at any moment.

transformers writes ``checkpoint-N`` file by file (model, optimizer, scheduler, RNG state, then
``trainer_state.json``), straight into the final directory, and ``get_last_checkpoint`` picks the
highest N whatever state that directory is in. A run killed mid-save therefore leaves a directory
that a plain ``--resume_from_checkpoint`` would load: a truncated model file fails loudly, a missing
optimizer or ``trainer_state.json`` silently restarts the optimizer or the step count.

:class:`CompleteCheckpoints` marks a checkpoint once every file is written and on disk: ``MARKER``
(``wrpo_complete.json``: the step and the size of every file) is written last, atomically. Before a
save into a directory that already exists (a resumed run reaching a step the killed run had saved)
the old marker is removed first, so a re-save cut off midway never looks complete.
:func:`newest_complete_checkpoint` and :func:`resolve_resume` only trust marked directories whose
files still have the recorded sizes; :func:`train_from_checkpoint` does not train past ``max_steps``
when the checkpoint is the last one.

``save_total_limit``: transformers rotates (deletes the older checkpoints) at the end of
``Trainer._save_checkpoint``, before the ``on_save`` callbacks run, so with a limit of 1 a kill
between the two leaves no complete checkpoint at all. :func:`rotate_checkpoints` (put in place of
transformers' own while ``WRPOTrainer`` saves, :func:`keeping_the_newest_complete`) never deletes
the newest complete checkpoint;
:class:`CompleteCheckpoints` rotates again once the new checkpoint is marked, so the limit holds
between saves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from unittest import mock

import torch
import transformers.trainer
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

__all__ = [
    "MARKER",
    "CompleteCheckpoints",
    "checkpoint_problem",
    "is_complete",
    "newest_complete_checkpoint",
    "resolve_resume",
    "rotate_checkpoints",
    "train_from_checkpoint",
]

MARKER = "wrpo_complete.json"
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_OFF = ("", "false", "no", "0", "none", "off")
_LAST = ("true", "yes", "1", "last", "latest")

logger = logging.getLogger(__name__)


class CompleteCheckpoints(TrainerCallback):
    """Writes ``MARKER`` into ``checkpoint-{global_step}`` after transformers saved it (``on_save``
    runs after ``Trainer._save_checkpoint`` returned), and removes a stale one from that directory
    before a save into it starts.

    A save is decided in ``on_step_end`` / ``on_epoch_end`` (``DefaultFlowCallback``, which comes
    before any user callback, sets ``control.should_save``) and happens right after those events, so
    that is where the old marker goes. Under ``save_strategy="best"`` the save is decided after an
    evaluation during training, with no event in between: the marker goes in ``on_evaluate``, whether
    or not a save follows. Only the processes that write checkpoints (``args.should_save``) touch the
    marker; in a distributed run every process first waits for the others to finish their part of
    the save. Once marked, the older checkpoints beyond ``save_total_limit`` are deleted
    (:func:`rotate_checkpoints`; transformers' own rotation, before the marker, kept them).
    """

    def __init__(self):
        self._training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._training = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_evaluate(self, args, state, control, **kwargs):
        if self._training and args.save_strategy == "best":
            self._unmark(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._unmark(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._unmark(args, state)

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process's shards and RNG state are written
        if not args.should_save:
            return
        path = _checkpoint_dir(args, state)
        if path.is_dir():
            mark_complete(path, state.global_step)
            rotate_checkpoints(
                args.output_dir, args.save_total_limit, state.best_model_checkpoint, use_mtime=True
            )
        else:
            logger.warning("%s was not written (custom output dir?): not marked complete", path)

    @staticmethod
    def _unmark(args, state):
        if args.should_save:
            unmark(_checkpoint_dir(args, state))


def _checkpoint_dir(args, state) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def _files(path: Path) -> dict[str, int]:
    """Every file under ``path`` (relative name -> size), the marker and temporary files left out."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MARKER and not f.name.startswith(f".{MARKER}"):
            out[f.relative_to(path).as_posix()] = f.stat().st_size
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(path: str | os.PathLike, step: int) -> None:
    """Flush every file of the checkpoint to disk, then write ``MARKER`` atomically (temporary file,
    fsync, rename, fsync of the directory): after a crash it is either absent or whole."""
    path = Path(path)
    files = _files(path)
    for name in files:
        _fsync(path / name)
    for d in {(path / name).parent for name in files} | {path}:
        _fsync(d)
    tmp = path / f".{MARKER}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"step": int(step), "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / MARKER)
    _fsync(path)


def unmark(path: str | os.PathLike) -> None:
    """Remove ``MARKER`` from ``path`` (if there), durably, before the checkpoint is overwritten."""
    path = Path(path)
    try:
        (path / MARKER).unlink()
    except FileNotFoundError:
        return
    _fsync(path)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` holds a marked, intact checkpoint; else what is wrong with it."""
    path = Path(path)
    try:
        record = json.loads((path / MARKER).read_text())
        step, files = int(record["step"]), dict(record["files"])
    except FileNotFoundError:
        return f"no {MARKER} (cut off mid-write, or not written by wrpo)"
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    m = _CHECKPOINT_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        return f"{MARKER} is for step {step}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when it was saved"
    return None


def is_complete(path: str | os.PathLike) -> bool:
    return checkpoint_problem(path) is None


def _checkpoint_dirs(output_dir) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-N`` directories of ``output_dir``, the newest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_DIR.match(p.name)) and p.is_dir()
    ]
    return sorted(found, reverse=True)


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step ``checkpoint-N`` directory of ``output_dir`` that is marked complete (and
    intact), or None. Unmarked directories, however high their step, are skipped."""
    for _, path in _checkpoint_dirs(output_dir):
        if is_complete(path):
            return str(path)
    return None


def rotate_checkpoints(
    output_dir: str | os.PathLike,
    save_total_limit: int | None = None,
    best_model_checkpoint: str | None = None,
    use_mtime: bool = False,
    checkpoint_prefix: str = PREFIX_CHECKPOINT_DIR,
) -> None:
    """``transformers.trainer_utils.rotate_checkpoints`` (delete the oldest checkpoints beyond
    ``save_total_limit``, never the most recent nor ``best_model_checkpoint``), except that the newest
    complete checkpoint (:func:`newest_complete_checkpoint`, what a resume picks) is kept too.

    transformers calls it at the end of ``Trainer._save_checkpoint``, before ``on_save`` marks the new
    checkpoint: the previous complete one then stays (one checkpoint over the limit) until
    :class:`CompleteCheckpoints` has marked the new one and calls it again. Without markers (a plain
    transformers run) it deletes exactly what transformers' own does."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(str(output_dir), checkpoint_prefix, use_mtime)
    if len(checkpoints) <= save_total_limit:
        return
    protected = {checkpoints[-1]}
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    if (newest := newest_complete_checkpoint(output_dir)) is not None:
        protected.add(newest)
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if checkpoint not in protected:
            logger.info("Deleting older checkpoint [%s] due to args.save_total_limit", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
            remaining -= 1


@contextlib.contextmanager
def keeping_the_newest_complete():
    """For the duration, transformers' Trainer rotates with :func:`rotate_checkpoints`
    (``Trainer._save_checkpoint`` looks the name up in its module at every save); trainers that mark
    their checkpoints wrap their ``_save_checkpoint`` in it."""
    with mock.patch.object(transformers.trainer, "rotate_checkpoints", rotate_checkpoints):
        yield


def _foreign_problem(path: Path) -> str | None:
    """What keeps an unmarked directory from being a whole transformers checkpoint, or None.

    Needs ``trainer_state.json``, model weights, ``optimizer.pt`` and ``scheduler.pt``; every JSON
    file must parse and every weight or state file must be whole (:func:`_whole`)."""
    names = {f.name for f in path.iterdir() if f.is_file()}
    weights = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
    )
    if not names & set(weights):
        return "no model weights"
    for needed in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
        if needed not in names:
            return f"no {needed}"
    for name in sorted(names):
        f = path / name
        if name.endswith(".json"):
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                return f"{name} is not valid JSON (truncated?)"
            if name.endswith(".index.json"):  # sharded weights: every shard there
                shards = set(json.loads(f.read_text()).get("weight_map", {}).values())
                if missing := sorted(shards - names):
                    return f"{missing[0]} (a shard in {name}) is missing"
        if not _whole(f):
            return f"{name} is truncated"
    return None


def _whole(f: Path) -> bool:
    """A ``.safetensors`` file as long as its header says, a torch ``.pt``/``.pth``/``.bin`` file (a
    zip archive) ending in its zip directory; other files are taken as they are."""
    if f.name.endswith((".pt", ".pth", ".bin")):
        return zipfile.is_zipfile(f)
    if not f.name.endswith(".safetensors"):
        return True
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError):
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return f.stat().st_size == 8 + n + end


def resolve_resume(value, output_dir: str | os.PathLike) -> str | None:
    """What to pass to ``Trainer.train(resume_from_checkpoint=...)`` for ``--resume_from_checkpoint``.

    - None, False, "false", "no", "0", "none", "off", "": None (no resume).
    - True, "true", "yes", "1", "last", "latest": the newest complete checkpoint in ``output_dir``
      (:func:`newest_complete_checkpoint`). When there is none, None and a logged warning: training
      starts from scratch, so a command that always carries the flag works for the first run too
      and after a kill before the first checkpoint was complete (transformers raises instead).
    - anything else is a path, returned as it is when it holds a complete checkpoint. A directory
      without ``MARKER`` (written by plain transformers or an older wrpo) is accepted, with a
      warning, when it looks like a whole transformers checkpoint (``trainer_state.json``, model
      weights, ``optimizer.pt``, ``scheduler.pt``, none of them truncated). Anything else raises
      ValueError naming the path and what is wrong: a missing directory, a checkpoint cut off
      mid-write, a marked one whose files changed since.
    """
    if value is None or value is False:
        return None
    if value is True or str(value).strip().lower() in _LAST:
        found = newest_complete_checkpoint(output_dir)
        found_step = -1 if found is None else int(_CHECKPOINT_DIR.match(Path(found).name).group(1))
        newer = [p.name for step, p in _checkpoint_dirs(output_dir) if step > found_step]  # incomplete
        skipped = f" (skipped, incomplete: {', '.join(newer)})" if newer else ""
        if found is None:
            logger.warning(
                "--resume_from_checkpoint: no complete checkpoint in %s%s; training starts from scratch",
                output_dir,
                skipped,
            )
        else:
            logger.warning("--resume_from_checkpoint: resuming from %s%s", found, skipped)
        return found
    if str(value).strip().lower() in _OFF:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    if (path / MARKER).exists() or (foreign := _foreign_problem(path)) is not None:
        detail = problem if (path / MARKER).exists() else f"{problem}; {foreign}"
        newest = newest_complete_checkpoint(path.parent)
        hint = f"; the newest complete checkpoint there is {newest}" if newest else ""
        raise ValueError(f"--resume_from_checkpoint {path}: incomplete checkpoint ({detail}){hint}")
    logger.warning(
        "--resume_from_checkpoint %s has no %s (not written by wrpo?); its files look whole: resuming",
        path,
        MARKER,
    )
    return str(path)


def train_from_checkpoint(trainer, checkpoint: str | None):
    """``trainer.train(resume_from_checkpoint=checkpoint)``, except when ``checkpoint`` is already at
    ``args.max_steps`` (a run killed after its last checkpoint, or rerun once finished): then its
    weights and trainer state are loaded and nothing is trained (returns None).

    transformers (5.x) would run one more optimizer step in that case when ``max_steps`` does not
    end an epoch: the loop checks for the end only after a step. DeepSpeed and FSDP models load
    their checkpoint after ``accelerator.prepare``; those still go through ``train``.
    """
    if checkpoint is not None and trainer.args.max_steps > 0:
        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        done = state.global_step >= trainer.args.max_steps
        if done and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
            logger.warning(
                "%s is at step %d of %d: nothing left to train",
                checkpoint,
                state.global_step,
                trainer.args.max_steps,
            )
            trainer._load_from_checkpoint(checkpoint)
            trainer.state = state
            return None
    return trainer.train(resume_from_checkpoint=checkpoint)
