"""The batch layout a model trains in, decided in one place from its capabilities (docs/models.md).

Layouts: *padded* (one sequence per row, the model's own attention), *packed* (sequences back to back
in padding-free rows, told apart by ``position_ids`` restarting at 0) and *shared prefix* (packed, each
prompt encoded once for its K responses, ``wrpo/data/collate.py``). :func:`plan_layout` is a pure function
of a model's :class:`~wrpo.model.capabilities.Capabilities` and the requested options (None: automatic)
that returns a :class:`LayoutPlan` with the reason for each choice. A layout is on only where the
model can run it (capabilities) and where the zoo suite found it equal to the model's own forward for
that model type (``wrpo/assets/verified_layouts.json``, generated with ``docs/models.md`` by
``make zoo``). Asked for explicitly (``True``), a layout the model cannot run, or one the zoo found
wrong for its type, is an error naming why; one of a type the zoo has not seen (custom code) runs, and
the reason says so. A model type whose padded log-probs already differ from its own forward is
refused in every layout (:func:`refuse_unsupported`).

:func:`prepare_layout` applies a plan: packed rows run on ``wrpo_segments`` attention (or
flash-attention varlen where installed), and the convolution / state-space / linear-attention layers
of hybrid models run one sequence at a time (``wrpo/model/mixers.py``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from wrpo.data.collate import PreferenceCollator
from wrpo.model.attention import FLASH_ATTENTION as FLASH
from wrpo.model.attention import NAME as SEGMENT_ATTENTION
from wrpo.model.capabilities import Capabilities, causal_lm, read_capabilities
from wrpo.model.mixers import separate_sequences

logger = logging.getLogger(__name__)

PACKING_HELP = (
    "pack each batch into padding-free rows (exact; --packing false: padded rows). Default: on where the "
    "model supports it (the effective config says why not)"
)
PREFIX_SHARING_HELP = (
    "encode each prompt once for its K responses (exact; runs on wrpo_segments attention). Default: on "
    "with packing where the model supports it (the log says)"
)
VERIFIED_LAYOUTS = Path(__file__).parents[1] / "assets" / "verified_layouts.json"
LAYOUTS = ("padded", "packed", "packed_rows", "shared_prefix")
# attention implementations a model can leave for wrpo_segments / flash varlen with the same result
SWITCHABLE = (SEGMENT_ATTENTION, "sdpa", "eager", *FLASH)


@dataclass(frozen=True)
class LayoutPlan:
    """The layout of a run: packing and prefix sharing on or off with the reason, and the attention
    implementation packed rows run on (None: padded, the model's own)."""

    packing: bool
    packing_why: str
    prefix_sharing: bool
    sharing_why: str
    attention: str | None = None

    @property
    def row_per_group(self) -> bool:
        """One row per group, except under flash-attention varlen (one row for the batch)."""
        return self.attention not in FLASH

    def collator(self, pad_token_id: int) -> PreferenceCollator:
        """The collator that lays batches out as planned."""
        return PreferenceCollator(
            pad_token_id,
            packing=self.packing,
            row_per_group=self.row_per_group,
            prefix_sharing=self.prefix_sharing,
        )


@functools.cache
def verified_layouts() -> dict[str, dict[str, str]]:
    """model type -> layout -> "exact" or why not, as the zoo suite last measured it."""
    return json.loads(VERIFIED_LAYOUTS.read_text())["models"]


def unverified(caps: Capabilities, *layouts: str) -> tuple[str | None, bool]:
    """(why the zoo did not find ``layouts`` exact for this model type, or None; whether it found one
    of them wrong: not exact or failing, which an explicit request cannot override)."""
    statuses = verified_layouts().get(caps.model_type, {})
    for layout in layouts:
        status = statuses.get(layout)
        if status is None:
            return f"not verified for model type {caps.model_type!r} (docs/models.md)", False
        if status != "exact":
            wrong = status.startswith(("differs", "error"))
            return f"{layout} not exact for model type {caps.model_type!r} ({status}; docs/models.md)", wrong
    return None, False


def refuse_unsupported(caps: Capabilities) -> None:
    """ValueError for a model type whose log-probs the zoo found wrong in every layout (its head does
    more than the fused loss knows, or its batched forward differs from its own one)."""
    padded = verified_layouts().get(caps.model_type, {}).get("padded", "")
    if padded.startswith("differs"):
        raise ValueError(
            f"{caps.class_name} (model type {caps.model_type!r}) is not supported: its log-probs here differ "
            f"from its own forward ({padded.split(':', 1)[1].strip()}; docs/models.md)"
        )


def check_layout_request(*, packing: bool | None, prefix_sharing: bool | None) -> None:
    """Refuse prefix sharing asked for with packing turned off (it packs a group's responses after its
    prompt): checked by the configs when parsed and by :func:`plan_layout`."""
    if prefix_sharing and packing is False:
        raise ValueError(
            "--prefix_sharing needs --packing (it packs each group's responses after its prompt)"
        )


def cannot_pack(caps: Capabilities) -> str | None:
    """Why ``caps``' model cannot run packed rows exactly, or None if it can."""
    if caps.packing_blocker is not None:
        return caps.packing_blocker
    name = caps.class_name
    if caps.attention not in SWITCHABLE:
        return f"{name} uses {caps.attention!r} attention (supported: {', '.join(SWITCHABLE)})"
    if not caps.interface_attention:
        return f"{name} computes attention outside transformers' attention interface (cannot switch it)"
    return None


def plan_layout(caps: Capabilities, *, packing: bool | None, prefix_sharing: bool | None) -> LayoutPlan:
    """The layout for a model with capabilities ``caps``; ``packing`` / ``prefix_sharing``: True, False,
    or None (automatic). Raises ValueError where an explicit True cannot run (naming why)."""
    refuse_unsupported(caps)
    check_layout_request(packing=packing, prefix_sharing=prefix_sharing)
    if packing is False:
        return LayoutPlan(False, "turned off (--packing false)", False, "needs --packing")
    why = cannot_pack(caps)
    if why is not None:
        if packing or prefix_sharing:
            raise ValueError(f"--{'packing' if packing else 'prefix_sharing'}: {why}")
        return LayoutPlan(False, why, False, "needs --packing")
    flash = caps.attention in FLASH
    why, wrong = unverified(caps, "packed", "packed_rows")
    if why is not None:
        if wrong and (packing or prefix_sharing):
            raise ValueError(f"--{'packing' if packing else 'prefix_sharing'}: {why}")
        if not packing:
            hint = "" if wrong else "; --packing true runs it unverified"
            return LayoutPlan(False, why + hint, False, "needs --packing")
        packing_why = f"padding-free rows, as asked; {why}"
    else:
        packing_why = "padding-free rows" + (
            f", {caps.mixer_kinds_text} run per sequence" if caps.hybrid else ""
        )
    attention = caps.attention if flash else SEGMENT_ATTENTION
    sharing, sharing_why = _sharing(caps, prefix_sharing)
    if sharing:
        attention = SEGMENT_ATTENTION
    return LayoutPlan(True, packing_why, sharing, sharing_why, attention)


def _sharing(caps: Capabilities, requested: bool | None) -> tuple[bool, str]:
    if requested is False:
        return False, "turned off (--prefix_sharing false)"
    why, wrong = unverified(caps, "shared_prefix")
    if why is not None:
        if wrong and requested:
            raise ValueError(f"--prefix_sharing: {why}")
        if not requested:
            return False, why + ("" if wrong else "; --prefix_sharing true runs it unverified")
        return True, f"as asked, on {SEGMENT_ATTENTION} attention; {why}"
    if caps.attention in FLASH and requested is None:
        return False, (
            f"{caps.attention} runs unshared packed rows; --prefix_sharing true runs shared prefixes on "
            f"{SEGMENT_ATTENTION} (per-sequence sdpa) instead"
        )
    recompute = f"; its {caps.mixer_kinds_text} recompute the prompt per response" if caps.hybrid else ""
    return True, f"each prompt encoded once for its responses, on {SEGMENT_ATTENTION} attention{recompute}"


def plan_for(config, *models) -> LayoutPlan:
    """:func:`plan_layout` for every model that will run the batches (policy, reference; None skipped):
    the first that cannot run a layout turns it off for all (an explicit request raises)."""
    packing, sharing = getattr(config, "packing", None), getattr(config, "prefix_sharing", None)
    plans = [plan_layout(read_capabilities(m), packing=packing, prefix_sharing=sharing) for m in models if m]
    if not plans:
        raise ValueError("plan_for needs at least one model")
    off_packing = next((p for p in plans if not p.packing), None)
    if off_packing is not None:
        return off_packing
    off_sharing = next((p for p in plans if not p.prefix_sharing), None)
    return off_sharing or plans[0]


def prepare_layout(plan: LayoutPlan, *models) -> None:
    """Apply ``plan`` to the models: switch packed rows' attention implementation, and run hybrid
    models' convolution / recurrent layers one sequence at a time."""
    if not plan.packing:
        return
    for model in models:
        if model is None:
            continue
        lm = causal_lm(model)
        impl = lm.config._attn_implementation
        if plan.attention and impl != plan.attention:
            lm.set_attn_implementation(plan.attention)
            logger.info("%s attention switched from %s to %s", type(lm).__name__, impl, plan.attention)
        separate_sequences(lm)


def plan_and_prepare(config, *models, log: bool = True) -> LayoutPlan:
    """:func:`plan_for`, logged (packing and prefix sharing: on, or off and why; ``log=False`` where
    the caller prints the plan itself, as ``wrpo train``'s effective config does), then applied."""
    plan = plan_for(config, *models)
    if log:
        logger.warning("packing: %s (%s)", "on" if plan.packing else "off", plan.packing_why)
        logger.warning("prefix sharing: %s (%s)", "on" if plan.prefix_sharing else "off", plan.sharing_why)
    prepare_layout(plan, *models)
    return plan
