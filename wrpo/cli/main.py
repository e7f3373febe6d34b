"""``wrpo train [CONFIG.yaml] [--field value ...]``, ``wrpo sft ...``, ``wrpo data ...`` (entry ``wrpo``)."""

from __future__ import annotations

import sys
from pathlib import Path

from wrpo.data.preference import DataError
from wrpo.train.config import WRPOConfig, parse_config
from wrpo.train.tiny import TINY_DEFAULTS, is_bundled_tiny

USAGE = """usage: wrpo {train,sft} [CONFIG.yaml] [--field value ...]
       wrpo data {prompts,sample,score,build,split,tiny-model} ...

  wrpo sft     supervised fine-tuning on the completion: TRL's SFT rows (text, messages,
               prompt + completion) or preference rows (their first chosen response, y_ws)
  wrpo train   WRPO preference optimisation (loss_type dpo | simpo | ipo)
  wrpo data    build the training data: sample, score, build (x, y_ws, y_wt, y_l), split (`wrpo data -h`)

With no --model/--dataset both train the bundled tiny default (a small random-init Llama-style
model on arithmetic preferences) with its own settings; a --dataset gets the documented defaults.
Options: `wrpo train --help` (WRPO's), `wrpo train --help-all` (also transformers' TrainingArguments)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        from wrpo.data.construct.command import main as data_main

        return data_main(argv[1:])
    if not argv or argv[0] not in ("train", "sft"):
        print(USAGE, file=sys.stderr)
        return 2
    stage, rest = argv[0], argv[1:]
    if help_asked := {"-h", "--help", "--help-all"} & set(rest):
        from wrpo.cli.help import format_help

        print(format_help(stage, full="--help-all" in help_asked))
        return 0
    try:
        config = stage_config(stage, rest)
        check_local_paths(config)
        from wrpo.train.checkpoints import resolve_resume
        from wrpo.train.stage import load_examples, run_stage

        # a bad --resume_from_checkpoint path fails here, before any model is loaded
        config.resume_from_checkpoint = resolve_resume(config.resume_from_checkpoint, config.output_dir)

        examples = load_examples(config, stage)
    except (DataError, ValueError) as err:
        print(f"wrpo {stage}: {err}", file=sys.stderr)
        return 2
    try:
        run_stage(stage, config, examples)
    finally:
        _close_process_group()
    return 0


def stage_config(stage: str, argv: list[str]) -> WRPOConfig:
    """The config of ``wrpo {stage} ARGV``; the bundled tiny default (tiny model, no dataset) gets
    ``TINY_DEFAULTS`` under the YAML and the flags, a user's dataset the documented defaults."""
    defaults = {"output_dir": f"outputs/wrpo-{stage}"}
    config = parse_config(argv, **defaults)
    if not is_bundled_tiny(config):
        return config
    defaults.update(TINY_DEFAULTS)
    config = parse_config(argv, **defaults)
    if config.eval_rows == 0:  # nothing held out: no evaluation
        config = parse_config(argv, **{**defaults, "eval_strategy": "no"})
    return config


def check_local_paths(config) -> None:
    """A ``--model`` / ``--ref_model`` that looks like a local path (starts with / . or ~, or has more
    than one /) and does not exist is a one-line error, not a hub lookup that retries and fails."""
    for flag in ("model", "ref_model"):
        value = getattr(config, flag, None)
        if not value or value == "tiny":
            continue
        looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"--{flag} {value}: no such directory (a local path; hub ids read org/name)")


def _close_process_group() -> None:
    """Leave a distributed run cleanly: a process group still alive at interpreter exit can abort the
    process while its communication threads shut down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
