"""Prefix sharing in the trainers: whether it is on, and the attention it runs on (docs/method.md §7).

With prefix sharing each group's prompt is encoded once for its K responses
(:func:`wrpo.packing.pack_shared_prefix`); the loss, log-probs and gradients are those of the unshared
packed layout. It needs packing and a model body that takes ``position_ids`` and runs its attention
through transformers' attention interface; the models then run on ``wrpo_segments``
(:mod:`wrpo.attention`), which applies each layer's sliding window and soft cap and never builds an
[L, L] mask. ``prefix_sharing=None`` (the default) turns it on wherever that holds and says why not
where it does not; ``True`` raises instead.
"""

from __future__ import annotations

import inspect
import logging

from .attention import NAME as SEGMENT_ATTENTION
from .model_loss import causal_lm

logger = logging.getLogger(__name__)

# the option's help, the same in ``wrpo train`` and the TRL adapter
PREFIX_SHARING_HELP = (
    "encode each prompt once for its K responses (exact; runs on wrpo_segments attention). Default: on "
    "with packing where the model supports it (the log says)"
)

# attention implementations a model can leave for ``wrpo_segments`` with the same result
SWITCHABLE = (SEGMENT_ATTENTION, "sdpa", "eager", "flash_attention_2", "flash_attention_3")
# kept unshared unless asked: their varlen kernels may beat per-sequence sdpa (not measured yet)
FLASH = ("flash_attention_2", "flash_attention_3")


def unsupported_because(model) -> str | None:
    """Why ``model`` cannot run shared-prefix rows exactly, or None if it can."""
    lm = causal_lm(model)
    name = type(lm).__name__
    body = getattr(lm, lm.base_model_prefix, None)
    if body is None or "position_ids" not in inspect.signature(body.forward).parameters:
        return f"{name} takes no position_ids (a response's positions must restart after its prompt)"
    impl = lm.config._attn_implementation
    if impl not in SWITCHABLE:
        return f"{name} uses {impl!r} attention (supported: {', '.join(SWITCHABLE)})"
    return None


def prefix_sharing_plan(config, *models) -> tuple[bool, str]:
    """-> (on, reason) from ``config.prefix_sharing`` (None: automatic), ``config.packing`` and the
    models that will run the batches (policy, reference; None entries skipped)."""
    requested = getattr(config, "prefix_sharing", None)
    if requested is False:
        return False, "turned off (--prefix_sharing false)"
    if not config.packing:
        if requested:
            raise ValueError(
                "--prefix_sharing needs --packing (it packs each group's responses after its prompt)"
            )
        return False, "needs --packing"
    for model in models:
        why = None if model is None else unsupported_because(model)
        if why is not None:
            if requested:
                raise ValueError(f"--prefix_sharing: {why}")
            return False, why
        impl = None if model is None else causal_lm(model).config._attn_implementation
        if impl in FLASH and requested is None:
            return False, (
                f"{impl} runs unshared packed rows; --prefix_sharing true runs shared prefixes on "
                f"{SEGMENT_ATTENTION} (per-sequence sdpa) instead"
            )
    return True, f"each prompt encoded once for its responses, on {SEGMENT_ATTENTION} attention"


def prepare_prefix_sharing(*models) -> None:
    """Switch the models' attention to ``wrpo_segments`` (flash-attention varlen would run each response
    on from the one before it; sdpa/eager would need an [R, L, L] mask without sliding windows)."""
    for model in models:
        if model is None:
            continue
        lm = causal_lm(model)
        impl = lm.config._attn_implementation
        if impl != SEGMENT_ATTENTION:
            lm.set_attn_implementation(SEGMENT_ATTENTION)
            logger.info("prefix sharing: %s attention switched from %s to %s", type(lm).__name__, impl,
                        SEGMENT_ATTENTION)  # fmt: skip


def plan_and_prepare(config, *models) -> bool:
    """:func:`prefix_sharing_plan`, logged (on, or off and why); on: :func:`prepare_prefix_sharing`."""
    on, why = prefix_sharing_plan(config, *models)
    logger.warning("prefix sharing: %s (%s)", "on" if on else "off", why)
    if on:
        prepare_prefix_sharing(*models)
    return on
