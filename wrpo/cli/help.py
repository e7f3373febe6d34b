"""``wrpo train --help``: WRPO's own options first; ``--help-all`` adds transformers' TrainingArguments.

The help is printed by HfArgumentParser parsers over subsets of WRPOConfig's fields (display only;
the command line itself is parsed over the whole WRPOConfig by :func:`wrpo.train.config.parse_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from transformers import HfArgumentParser

from wrpo.train.config import WRPOConfig, WRPOOptions
from wrpo.train.tiny import tiny_defaults_note

WRPO_GROUP = "WRPO options"
TRAINING_GROUP = "transformers TrainingArguments options"


# options that only the preference stage reads (``wrpo sft`` trains the NLL of the completion)
PREFERENCE_ONLY = (
    "ref_model",
    "loss_type",
    "beta",
    "alpha",
    "alpha_schedule",
    "chosen_weights",
    "gamma",
    "label_smoothing",
    "nll_weight",
    "precompute_ref_logps",
    "ref_logps_cache",
)


def own_fields(stage: str = "train") -> list[str]:
    """The fields declared in wrpo/train/config.py (WRPOConfig's own, then the WRPOOptions it shares with
    the TRL adapter, in declaration order) that ``stage`` reads (sft: not the preference-only ones)."""
    names = [*WRPOConfig.__annotations__, *WRPOOptions.__annotations__]
    return [n for n in names if stage != "sft" or n not in PREFERENCE_ONLY]


def _options(names: list[str], group: str) -> type:
    """A dataclass holding copies of WRPOConfig's fields ``names``, shown as argument group ``group``."""
    hints = typing.get_type_hints(WRPOConfig)
    by_name = {f.name: f for f in dataclasses.fields(WRPOConfig) if f.init}
    specs = []
    for name in names:
        f = by_name[name]
        copy = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
        specs.append((name, hints[name], copy))
    return dataclasses.make_dataclass(
        "Options", specs, kw_only=True, namespace={"_argument_group_name": group}
    )


def _parser(stage: str, full: bool) -> HfArgumentParser:
    own = own_fields(stage)
    types = [_options(own, WRPO_GROUP)]
    if full:
        every_own = own_fields()
        rest = [f.name for f in dataclasses.fields(WRPOConfig) if f.init and f.name not in every_own]
        types.append(_options(rest, TRAINING_GROUP))
    parser = HfArgumentParser(
        types,
        prog=f"wrpo {stage}",
        usage=f"wrpo {stage} [CONFIG.yaml] [--field value ...]",
        description="A YAML file's fields come first, command-line flags override them; --field-name "
        f"works as well as --field_name. The {tiny_defaults_note()}.",
        epilog=None if full else f"{TRAINING_GROUP}: `wrpo {stage} --help-all`; all of them work here.",
    )
    parser.add_argument("--help-all", action="help", help="also list the " + TRAINING_GROUP)
    parser.set_defaults(output_dir=f"outputs/wrpo-{stage}")
    for action in parser._actions:
        _tidy(action)
    return parser


def _tidy(action: argparse.Action) -> None:
    """One spelling per option (--field_name); ``--no_FIELD`` is described in FIELD's help."""
    names = [s for s in action.option_strings if "-" not in s.lstrip("-")]
    if names and names[0] == f"--no_{action.dest}":
        action.help = argparse.SUPPRESS
    action.option_strings = names or action.option_strings


def format_help(stage: str, *, full: bool = False) -> str:
    """The help of ``wrpo {stage}``: WRPO's options (each with its default), and with ``full`` the
    TrainingArguments ones after them."""
    return _parser(stage, full).format_help()
