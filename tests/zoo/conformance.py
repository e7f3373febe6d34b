"""Each layout of the library against the model's own forward, for one architecture (fp64).

A layout is run as the trainers run it: ``wrpo.model.layout.prepare_layout`` (packed rows on
``wrpo_segments`` attention, hybrid models' convolution / recurrent layers per sequence), the
collator of ``wrpo/data/collate.py``, then ``wrpo.sequence_logps``. The verified-layouts table is bypassed
(it is what this suite writes), the capabilities are not: a layout the model cannot run is recorded
"off: <why>". Status per layout: ``exact`` (relative error <= ``EXACT``), ``differs: <error>``,
``off: <why>`` or ``error: <exception>``.
"""

from __future__ import annotations

import copy
from unittest import mock

import torch

from wrpo import PreferenceCollator, sequence_logps
from wrpo.model import losses as model_loss
from wrpo.model.attention import NAME as SEGMENT_ATTENTION
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import LAYOUTS, LayoutPlan, cannot_pack, prepare_layout

from .architectures import TEXT_VOCAB, build_tiny
from .reference import make_groups, own_sequence_logps, relative_error

EXACT = 1e-7  # fp64 models; some compute softmax or routing in fp32 (eager: ~5e-9); leaks are >= 1e-4
PAD = 0


def layout_plan(layout: str) -> LayoutPlan:
    """The plan that runs ``layout`` (the verified table bypassed)."""
    if layout == "padded":
        return LayoutPlan(False, "", False, "")
    sharing = layout == "shared_prefix"
    attention = SEGMENT_ATTENTION
    return LayoutPlan(True, "", sharing, "", attention)


def collator(layout: str) -> PreferenceCollator:
    if layout == "padded":
        return PreferenceCollator(PAD, packing=False)
    return PreferenceCollator(
        PAD, packing=True, row_per_group=layout != "packed", prefix_sharing=layout == "shared_prefix"
    )


def layout_logps(model, groups, layout: str) -> torch.Tensor:
    """[S] log-probs of ``groups`` under ``model`` in ``layout`` (the model is prepared in place).
    Model types the table marks unsupported are run too: the table is what this measures."""
    prepare_layout(layout_plan(layout), model)
    with mock.patch.object(model_loss, "refuse_unsupported", lambda caps: None):
        return sequence_logps(model, collator(layout)(groups), backend="torch")


def check_architecture(model, *, seed: int = 0) -> dict[str, str]:
    """layout -> status for one tiny fp64 model (each layout on its own copy of the model)."""
    groups = make_groups(TEXT_VOCAB, seed=seed)  # ids below the special (image, audio, ...) ones
    truth = own_sequence_logps(model, groups)
    statuses = {}
    for layout in LAYOUTS:
        statuses[layout] = _status(model, groups, layout, truth)
    return statuses


def _status(model, groups, layout: str, truth: torch.Tensor) -> str:
    if layout != "padded":
        why = cannot_pack(read_capabilities(model))
        if why is not None:
            return f"off: {why}"
    candidate = copy.deepcopy(model)
    try:
        with torch.no_grad():
            logps = layout_logps(candidate, groups, layout)
    except Exception as e:  # recorded in the matrix, with the exception's first line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"error: {type(e).__name__}: {first}"
    err = relative_error(logps.double(), truth.double())
    if not logps.isfinite().all():
        return "error: NaN log-probs" + (
            " (fp64 eager attention over padding gives NaN)" if layout == "padded" else ""
        )
    return "exact" if err <= EXACT else f"differs: relative error {err:.1e}"


def check_one(name: str) -> tuple[str, dict | str]:
    """name -> (name, {"class", "mixers", layout: status, ...}), or (name, why it is skipped)."""
    built = build_tiny(name)
    if built.model is None:
        return name, built.skip
    caps = read_capabilities(built.model)
    return name, {
        "class": caps.class_name,
        "mixers": list(caps.mixer_kinds),
        **check_architecture(built.model),
    }
