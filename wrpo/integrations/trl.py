"""TRL backend: ``WRPOConfig(trl.DPOConfig)`` and ``WRPOTrainer(trl.DPOTrainer)``.

Switching from TRL is one import::

    from wrpo.integrations.trl import WRPOConfig, WRPOTrainer  # instead of trl's DPOConfig, DPOTrainer

TRL's standard preference data (``prompt`` / ``chosen`` / ``rejected``, text or conversational) trains
as DPO (K = 2); WRPO data (``chosen: [y_ws, y_wt]``, or ``source_chosen`` / ``target_chosen``) as K = 3,
and any K the data gives. Tokenization is TRL's own (``wrpo/integrations/trl_data.py``). The loss goes
through :func:`wrpo.preference_loss`: the body and the fused head inside the model call, rows packed
without padding (``packing``), each prompt encoded once for its responses (``prefix_sharing``; both
decided per model in ``wrpo/model/layout.py``), exact gradient accumulation, the alpha schedule of
``wrpo train``.
TRL options this backend does not implement are refused when the trainer is built.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from torch.utils.data import DataLoader
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt
from trl.models import prepare_deepspeed
from trl.trainer.utils import use_adapter

from wrpo.integrations.trl_data import LAYOUTS, detect_layout, expand_to_pairs, layout_message, regroup
from wrpo.train.config import WRPOOptions, set_cpu_processes
from wrpo.train.core import LossOptions, TrainerCore, reference_logps
from wrpo_kernels.metrics import reward_metrics
from wrpo_kernels.objective import make_spec

logger = logging.getLogger(__name__)

# TRL loss_type (one, or sigmoid + sft as RPO) -> ours
LOSS_TYPES = {"sigmoid": "dpo", "ipo": "ipo", "simpo": "simpo"}


@dataclass
class WRPODPOConfig(WRPOOptions, DPOConfig):
    """TRL's ``DPOConfig`` plus the WRPO options (``wrpo.train.config.WRPOOptions``); ``loss_type`` takes
    ``"sigmoid"``, ``"ipo"``, ``"simpo"``, or ``["sigmoid", "sft"]`` for DPO + NLL on the chosen response."""

    chosen_layout: str = field(
        default="auto",
        metadata={
            "help": f"one of {LAYOUTS}: how to read a list in `chosen` (see wrpo/integrations/trl_data.py)"
        },
    )

    def __post_init__(self):
        set_cpu_processes(self)
        super().__post_init__()
        self.check_options(chosen_layout=LAYOUTS)


def loss_options(args: WRPODPOConfig) -> tuple[str, float]:
    """(our loss_type, nll_weight) for TRL's ``loss_type`` / ``loss_weights``; refuses what we lack."""
    types, weights = list(args.loss_type), args.loss_weights or [1.0] * len(args.loss_type)
    nll = 0.0
    if types[1:] == ["sft"] and types[0] == "sigmoid":
        types, nll = ["sigmoid"], float(weights[1])
        weights = weights[:1]
    if len(types) != 1 or types[0] not in LOSS_TYPES:
        raise ValueError(
            f"WRPOConfig.loss_type={args.loss_type!r} is not supported by the wrpo backend; use one of "
            f"{sorted(LOSS_TYPES)} or ['sigmoid', 'sft'] (or trl.DPOTrainer for the others)"
        )
    if weights != [1.0]:
        raise ValueError(
            f"WRPOConfig.loss_weights={args.loss_weights!r}: only a weight of 1.0 for {types[0]!r}"
        )
    return LOSS_TYPES[types[0]], nll


def refuse_unsupported(args: WRPODPOConfig) -> None:
    """Errors naming each TRL option this backend does not implement (rather than ignoring it)."""
    loss_type, _ = loss_options(args)
    refused = {
        "f_divergence_type": args.f_divergence_type != "reverse_kl",
        "ld_alpha": args.ld_alpha is not None,
        "use_weighting": bool(args.use_weighting),
        "sync_ref_model": bool(args.sync_ref_model),
        "truncation_mode": args.truncation_mode != "keep_start",
        "label_smoothing (with ipo)": loss_type == "ipo" and args.label_smoothing != 0,
    }
    bad = [name for name, is_set in refused.items() if is_set]
    if bad:
        raise ValueError(
            f"WRPOConfig options not supported by the wrpo backend: {', '.join(bad)} "
            "(leave them at their defaults, or use trl.DPOTrainer)"
        )


class WRPODPOTrainer(TrainerCore, DPOTrainer):
    """``trl.DPOTrainer`` with the fused WRPO/DPO loss of ``wrpo_kernels`` (see the module docstring)."""

    def __init__(
        self, model, ref_model=None, args: WRPODPOConfig | None = None, train_dataset=None, **kwargs
    ):
        if not isinstance(args, WRPODPOConfig):
            raise TypeError(
                f"WRPOTrainer needs a wrpo.integrations.trl.WRPOConfig, got {type(args).__name__}"
            )
        refuse_unsupported(args)
        if train_dataset is not None:
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                raise ValueError("WRPOTrainer: vision datasets are not supported by the wrpo backend")
        if args.padding_free:  # TRL has it switched off; packing does it
            args.padding_free, args.packing = False, True
        loss_type, nll_weight = loss_options(args)
        self._loss_options = LossOptions.of(args, loss_type=loss_type, nll_weight=nll_weight)
        if (
            ref_model is None
            and isinstance(model, PreTrainedModel)
            and not is_peft_model(model)
            and kwargs.get("peft_config") is None
            and not args.precompute_ref_log_probs
            and loss_type != "simpo"
        ):
            ref_model = copy.deepcopy(model)  # the starting policy, as wrpo train does (TRL would reload it)
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=train_dataset, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError(
                "WRPOTrainer: the MoE router auxiliary loss is not supported by the wrpo backend"
            )
        self.data_collator = self.collator(self._tokenizer.pad_token_id)
        self.model_accepts_loss_kwargs = True  # transformers versions without ``loss_is_scaled_for_ga``

    # ---- data ---------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Groups {prompt_ids, responses [K], num_chosen} tokenized by TRL's own preparation."""
        if "responses" in dataset.column_names and "prompt_ids" in dataset.column_names:
            return dataset  # already prepared
        first = next(iter(dataset))
        layout = detect_layout(first) if args.chosen_layout == "auto" else args.chosen_layout
        logger.warning(layout_message(dataset_name, layout, args.chosen_layout))
        if "prompt" not in first:
            dataset = dataset.map(extract_prompt)
        pairs = expand_to_pairs(dataset, layout)
        tokenized = super()._prepare_dataset(pairs, processing_class, args, dataset_name)
        groups = regroup(tokenized, args.max_length)
        if len(groups) == 0:
            raise ValueError(f"WRPOTrainer: no {dataset_name} row left after tokenization (max_length?)")
        return groups

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "responses", "num_chosen", "ref_logps"]

    @torch.no_grad()
    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Adds ``ref_logps`` [K] per group, from the reference model (or the starting policy)."""
        loader = DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.collator(self._tokenizer.pad_token_id)
        )
        loader = self.accelerator.prepare(loader)
        out = []
        for batch in loader:
            logps = self.reference_model_logps(batch, precomputing=True)
            out.append(self.accelerator.gather_for_metrics(logps).float().cpu())
        logps = torch.cat(out)[: len(dataset)]
        return dataset.add_column("ref_logps", logps.tolist())

    # ---- loss ---------------------------------------------------------------------------------------

    def loss_options(self) -> LossOptions:
        return self._loss_options

    @torch.no_grad()
    def reference_model_logps(self, inputs, precomputing: bool = False):
        """[B, K] reference log-probs from the reference model, or from the policy with its PEFT adapter
        disabled; ``precomputing`` (before training): from the policy itself when there is neither."""
        model, adapter = self.ref_model, contextlib.nullcontext()
        if model is None:
            if not (precomputing or is_peft_model(self.model)):
                raise ValueError("WRPOTrainer: no reference model and no precomputed ref_logps")
            model = self.model
            if precomputing and self.is_deepspeed_enabled:  # before DeepSpeed prepared the policy
                # (ZeRO-3: partitioned): TRL's inference engine over it gathers the parameters, as in TRL
                if getattr(self, "_precompute_engine", None) is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            if is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = use_adapter(
                    unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
                )
        with adapter, self.accelerator.autocast():
            return reference_logps(model, inputs, **self.loss_options().head)

    def step_metrics(self, out, inputs, ref) -> dict:
        """Metrics under TRL's names (rewards/*, logps/*, logits/*) plus WRPO's. TRL's reward metrics are
        beta * (logps - ref_logps) for every loss type; so are ours here (ipo's own rewards differ)."""
        metrics = dict(out.metrics)
        options = self._loss_options
        if options.loss_type == "ipo":  # the rewards of the same step's dpo spec
            spec = make_spec(
                responses_per_prompt=inputs["responses_per_prompt"],
                num_chosen=inputs["num_chosen"],
                alpha=self.current_alpha(),
                chosen_weights=options.chosen_weights,
                beta=options.beta,
            )
            metrics.update(reward_metrics(spec, out.logps, ref, lengths=None))
        return metrics


# the names users import (``from wrpo.integrations.trl import WRPOConfig, WRPOTrainer``)
WRPOConfig = WRPODPOConfig
WRPOTrainer = WRPODPOTrainer

__all__ = [
    "WRPOConfig",
    "WRPODPOConfig",
    "WRPODPOTrainer",
    "WRPOTrainer",
    "loss_options",
    "refuse_unsupported",
]
