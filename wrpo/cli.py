"""``wrpo train [CONFIG.yaml] [--field value ...]``, ``wrpo sft ...``, ``wrpo data ...`` (entry ``wrpo``)."""

from __future__ import annotations

import sys

from .config import parse_config
from .data import DataError

USAGE = """usage: wrpo {train,sft} [CONFIG.yaml] [--field value ...]
       wrpo data {prompts,sample,score,build,split,tiny-model} ...

  wrpo sft     supervised fine-tuning on the first chosen response (the source pick y_ws)
  wrpo train   WRPO preference optimisation (loss_type dpo | simpo | ipo)
  wrpo data    build the training data: sample, score, build (x, y_ws, y_wt, y_l), split (`wrpo data -h`)

With no --model/--dataset both train the bundled tiny default (a small random-init Llama-style
model on arithmetic preferences). Fields: `wrpo train --help`."""

# The bundled tiny default learns in minutes on a CPU with these; any flag or YAML field overrides them.
TINY_DEFAULTS = {
    "learning_rate": 2e-3,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "logging_steps": 10,
    "eval_rows": 60,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "beta": 0.1,
    "disable_tqdm": False,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        from .construct.cli import main as data_main

        return data_main(argv[1:])
    if not argv or argv[0] not in ("train", "sft"):
        print(USAGE, file=sys.stderr)
        return 2
    stage, rest = argv[0], argv[1:]
    try:
        defaults = {"output_dir": f"outputs/wrpo-{stage}"}
        config = parse_config(rest, **defaults)
        if config.model == "tiny":
            defaults.update(TINY_DEFAULTS)
            config = parse_config(rest, **defaults)
            if config.eval_rows == 0:  # nothing held out: no evaluation
                config = parse_config(rest, **{**defaults, "eval_strategy": "no"})
        from .checkpoints import resolve_resume
        from .pipeline import load_examples, run_stage

        # a bad --resume_from_checkpoint path fails here, before any model is loaded
        config.resume_from_checkpoint = resolve_resume(config.resume_from_checkpoint, config.output_dir)

        examples = load_examples(config)
    except (DataError, ValueError) as err:
        print(f"wrpo {stage}: {err}", file=sys.stderr)
        return 2
    try:
        run_stage(stage, config, examples)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave a distributed run cleanly: a process group still alive at interpreter exit can abort the
    process while its communication threads shut down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
