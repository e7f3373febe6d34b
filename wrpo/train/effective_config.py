"""The effective-config block ``wrpo train`` / ``wrpo sft`` print before training (main process only)."""

from __future__ import annotations

import math

from wrpo.model.layout import LayoutPlan
from wrpo.train.tiny import SAMPLE_DATA, is_bundled_tiny


def print_effective_config(
    stage: str, config, model, train, evaluation, layout: LayoutPlan, *, sft_formats: str | None = None
) -> None:
    """Print :func:`effective_config` on the main process."""
    if config.process_index == 0:
        text = effective_config(stage, config, model, train, evaluation, layout, sft_formats=sft_formats)
        print(text, flush=True)


def effective_config(
    stage: str, config, model, train, evaluation, layout: LayoutPlan, *, sft_formats: str | None = None
) -> str:
    """The settings this run trains with (``layout``: the run's planned and applied batch layout;
    ``sft_formats``: the row formats an sft run read, ``wrpo.data.sft.describe_formats``)."""
    lines = {
        "model": _model(config),
        "data": f"{config.dataset or SAMPLE_DATA}: train {len(train)} rows, eval {_rows(evaluation)} rows",
        "K": _responses(train),
        **_loss(stage, config, sft_formats),
        "lr": _lr(config),
        "batch": _batch(config),
        "steps": _steps(config, len(train)),
        "attention": getattr(model.config, "_attn_implementation", None) or "model default",
        "kernel": _kernel(config),
        "packing": _packing(config, layout),
        "prefix sharing": f"{'on' if layout.prefix_sharing else 'off'} ({layout.sharing_why})",
    }
    if is_bundled_tiny(config):
        lines["settings"] = "the bundled tiny default's own, unless set (`wrpo train --help` lists them)"
    width = max(map(len, lines)) + 2
    body = [f"  {name:<{width}}{value}" for name, value in lines.items()]
    return "\n".join([f"wrpo {stage}: effective config", *body])


def _rows(dataset) -> int:
    return 0 if dataset is None else len(dataset)


def _lr(config) -> str:
    scheduler = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    return f"{config.learning_rate:g} ({scheduler}, warmup {config.warmup_steps:g})"


def _model(config) -> str:
    if config.model == "tiny":
        return f"tiny (bundled, random init, seed_model {config.seed_model})"
    return config.model


def _responses(train) -> str:
    if len(train) == 0:
        return "no rows"
    k, chosen = len(train[0]["responses"]), train[0]["num_chosen"]
    return f"{k} responses per prompt ({chosen} chosen + {k - chosen} rejected)"


def _loss(stage: str, config, sft_formats: str | None = None) -> dict[str, str]:
    """``loss``, ``beta`` and ``alpha`` lines (sft: the NLL only, and the row formats read)."""
    if stage == "sft":
        rows = f"; rows: {sft_formats}" if sft_formats else ""
        return {"loss": f"nll on the completion (sft{rows})"}
    extras = [
        f"{name} {getattr(config, name)}"
        for name in ("gamma", "label_smoothing", "nll_weight")
        if getattr(config, name)
    ]
    if config.chosen_weights:
        alpha = f"chosen_weights {config.chosen_weights} (alpha unused)"
    else:
        alpha = f"{config.alpha}, schedule {config.alpha_schedule}"
    return {"loss": ", ".join([config.loss_type, *extras]), "beta": f"{config.beta}", "alpha": alpha}


def _batch(config) -> str:
    per, accum, world = (
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        config.world_size,
    )
    processes = "process" if world == 1 else "processes"
    return f"{per} per device x {accum} accumulation x {world} {processes} = {per * accum * world} global"


def _steps(config, rows: int) -> str:
    if config.max_steps > 0:
        return f"{config.max_steps} optimizer steps (max_steps)"
    per_epoch = updates_per_epoch(config, rows)
    total = math.ceil(config.num_train_epochs * per_epoch)
    return f"{config.num_train_epochs:g} epochs x {per_epoch} = {total} optimizer steps"


def updates_per_epoch(config, rows: int) -> int:
    """Optimizer steps per epoch as transformers' Trainer counts them (batches per process, then
    accumulation; a partial last batch counts unless ``dataloader_drop_last``)."""
    rounding = math.floor if config.dataloader_drop_last else math.ceil
    batches = rounding(rows / config.per_device_train_batch_size)
    per_process = rounding(batches / config.world_size)
    return max(math.ceil(per_process / config.gradient_accumulation_steps), 1)


def _kernel(config) -> str:
    if config.kernel_backend != "auto":
        return config.kernel_backend
    if config.device.type == "cuda":
        return "auto (triton once its self-test passes, else torch)"
    return "auto -> torch"


def _packing(config, layout: LayoutPlan) -> str:
    if not layout.packing:
        return f"off ({layout.packing_why}; padded rows)"
    chunk = f", chunk_tokens {config.chunk_tokens}" if config.chunk_tokens else ""
    return f"on ({layout.packing_why}{chunk})"
