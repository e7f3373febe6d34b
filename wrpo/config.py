"""``WRPOConfig``: transformers' TrainingArguments plus the method's options (defaults: the paper's)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from wrpo_kernels import BACKENDS, LOSS_TYPES

from .schedule import ALPHA_SCHEDULES


@dataclass
class WRPOConfig(TrainingArguments):
    """Options of ``wrpo train`` / ``wrpo sft``; every TrainingArguments field works too."""

    model: str = field(default="tiny", metadata={"help": "model path, or 'tiny' for the bundled default"})
    ref_model: str | None = field(
        default=None, metadata={"help": "reference model (default: the start policy)"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "JSONL/JSON file or saved datasets dir (default: bundled sample)"}
    )
    eval_rows: int = field(
        default=0, metadata={"help": "rows held out from the end of the data for evaluation"}
    )
    loss_type: str = field(default="dpo", metadata={"help": f"one of {LOSS_TYPES}"})
    beta: float = 0.01
    alpha: float = field(default=0.1, metadata={"help": "fusion coefficient: weight of the source responses"})
    alpha_schedule: str = field(default="linear", metadata={"help": f"one of {ALPHA_SCHEDULES}"})
    chosen_weights: list[float] | None = field(
        default=None, metadata={"help": "explicit weights of the chosen"}
    )
    gamma: float = 0.0
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    max_length: int = 2048
    max_prompt_length: int = 1800
    precompute_ref_logps: bool = False
    ref_logps_cache: str | None = field(
        default=None,
        metadata={"help": "directory of cached precomputed reference log-probs (default "
                  "$XDG_CACHE_HOME/wrpo/ref_logps, i.e. ~/.cache/wrpo/ref_logps); 'off' disables"},
    )  # fmt: skip
    kernel_backend: str = field(default="auto", metadata={"help": f"one of {BACKENDS}"})
    packing: bool = True
    prefix_sharing: bool | None = field(
        default=None,
        metadata={"help": "encode each prompt once for its K responses (exact; runs on wrpo_segments "
                  "attention). Default: on with packing where the model supports it (the log says)"},
    )  # fmt: skip
    chunk_tokens: int | None = None
    seed_model: int = field(default=0, metadata={"help": "seed of the tiny model's random initialisation"})
    output_dir: str = "outputs/wrpo"
    remove_unused_columns: bool = False

    def __post_init__(self):
        if _distributed_without_gpu():
            # Several processes (accelerate launch, torchrun) and no GPU: CPU DDP over gloo. Without
            # use_cpu, accelerate sees no distributed set-up there and every process trains alone.
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        super().__post_init__()
        check_choices(
            self, {"loss_type": LOSS_TYPES, "alpha_schedule": ALPHA_SCHEDULES, "kernel_backend": BACKENDS}
        )
        if self.prefix_sharing and not self.packing:
            raise ValueError(
                "--prefix_sharing needs --packing (it packs each group's responses after its prompt)"
            )
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must stay False: the collator reads the token columns")


def check_choices(config, choices: dict) -> None:
    """ValueError naming the first field of ``config`` whose value is not among its allowed ones."""
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"--{name} {value!r} is not one of {allowed}")


def _distributed_without_gpu() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def parse_config(argv: list[str], **defaults) -> WRPOConfig:
    """``[CONFIG.yaml] [--field value ...]``: the YAML's fields first, command-line flags override them.

    ``defaults`` are applied before both (e.g. the stage's own output_dir)."""
    args = [a for k, v in defaults.items() for a in _flag(k, v)]
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file holds a mapping of field: value")
        args += [a for k, v in values.items() for a in _flag(k, v)]
        argv = argv[1:]
    (config,) = HfArgumentParser(WRPOConfig).parse_args_into_dataclasses(args=args + list(argv))
    return config


def _flag(name, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [f"--{name}", *map(str, value)]
    return [f"--{name}", str(value)]
