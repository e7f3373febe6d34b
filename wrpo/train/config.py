"""``WRPOConfig``: transformers' TrainingArguments plus the method's options (defaults: the paper's)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from wrpo.data.preference import prompt_limit
from wrpo.model.layout import PACKING_HELP, PREFIX_SHARING_HELP, check_layout_request
from wrpo.train.alpha_schedule import ALPHA_SCHEDULES
from wrpo_kernels import BACKENDS, LOSS_TYPES


@dataclass
class WRPOOptions:
    """The method's options, shared by ``wrpo train``'s :class:`WRPOConfig` and the TRL adapter's config
    (``wrpo/integrations/trl.py``); :meth:`check_options` validates them."""

    alpha: float = field(default=0.1, metadata={"help": "fusion coefficient: weight of the source responses"})
    alpha_schedule: str = field(
        default="linear",
        metadata={"help": f"alpha over the steps, one of {ALPHA_SCHEDULES} (linear: alpha * step / steps)"},
    )
    chosen_weights: list[float] | None = field(
        default=None, metadata={"help": "explicit weights of the chosen responses (sum 1); None: from alpha"}
    )
    gamma: float = field(
        default=0.0, metadata={"help": "target reward margin of every group (SimPO's gamma)"}
    )
    kernel_backend: str = field(
        default="auto",
        metadata={"help": f"fused-loss backend, one of {BACKENDS}; auto: triton on a GPU, else torch"},
    )
    chunk_tokens: int | None = field(
        default=None, metadata={"help": "rows of logits the fused loss holds at once; None: automatic"}
    )
    packing: bool | None = field(default=None, metadata={"help": PACKING_HELP})
    prefix_sharing: bool | None = field(default=None, metadata={"help": PREFIX_SHARING_HELP})

    def check_options(self, **choices) -> None:
        """ValueError naming the first option out of its choices (``choices``: more fields -> allowed),
        or a layout request that cannot hold (prefix sharing without packing)."""
        check_choices(self, {"alpha_schedule": ALPHA_SCHEDULES, "kernel_backend": BACKENDS, **choices})
        check_layout_request(packing=self.packing, prefix_sharing=self.prefix_sharing)


@dataclass
class WRPOConfig(WRPOOptions, TrainingArguments):
    """Options of ``wrpo train`` / ``wrpo sft``; every TrainingArguments field works too."""

    model: str = field(default="tiny", metadata={"help": "model path, or 'tiny' for the bundled default"})
    ref_model: str | None = field(
        default=None, metadata={"help": "frozen reference model path; None: a copy of the start policy"}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "JSONL/JSON file or saved datasets dir; None: the bundled arithmetic sample"},
    )
    eval_rows: int = field(
        default=0, metadata={"help": "rows held out from the end of the data for evaluation"}
    )
    loss_type: str = field(default="dpo", metadata={"help": f"implicit reward, one of {LOSS_TYPES}"})
    beta: float = field(default=0.01, metadata={"help": "reward scale (ipo: target margin 1 / (2 beta))"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "probability that a preference label is flipped (dpo, simpo)"}
    )
    nll_weight: float = field(
        default=0.0, metadata={"help": "weight of the NLL on each group's first chosen response"}
    )
    max_length: int = field(default=2048, metadata={"help": "max tokens of prompt + response"})
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "prompt tokens kept (its end) when prompt + response is too long; None: "
            "1800/2048 of max_length (1800 at the default 2048)"
        },
    )
    precompute_ref_logps: bool = field(
        default=False, metadata={"help": "run the reference model once over the data first, then drop it"}
    )
    ref_logps_cache: str | None = field(
        default=None,
        metadata={
            "help": "cache directory of precomputed reference log-probs; None: "
            "$XDG_CACHE_HOME/wrpo/ref_logps (~/.cache/wrpo/ref_logps); 'off' disables it"
        },
    )
    seed_model: int = field(default=0, metadata={"help": "seed of the tiny model's random initialisation"})
    output_dir: str = field(
        default="outputs/wrpo",
        metadata={"help": "where the model, trainer_state.json and the curves are saved"},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "must stay False: the collator reads the token columns"}
    )

    def __post_init__(self):
        set_cpu_processes(self)
        if self.use_cpu or not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; DataLoader would warn on every run
        super().__post_init__()
        self.check_options(loss_type=LOSS_TYPES)
        self.max_prompt_length = prompt_limit(self.max_length, self.max_prompt_length)
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must stay False: the collator reads the token columns")


def check_choices(config, choices: dict) -> None:
    """ValueError naming the first field of ``config`` whose value is not among its allowed ones."""
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"--{name} {value!r} is not one of {allowed}")


def set_cpu_processes(args) -> None:
    """Several processes (accelerate launch, torchrun) and no GPU: gloo, with ``use_cpu``. Without it
    accelerate sees no distributed set-up there and every process trains alone (DDP), and DeepSpeed's
    batch check counts one process. Both configs (``wrpo train``'s and the TRL adapter's) call it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        args.use_cpu = True
        args.ddp_backend = args.ddp_backend or "gloo"


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
