"""Preference rows -> groups of K responses, tokenized by TRL's own dataset preparation.

Two readings of a ``chosen`` list clash. In TRL's conversational format it is *one* completion made
of several messages; in the released WRPO layout (``{"prompt", "chosen": [y_ws, y_wt],
"rejected": [y_l]}``) it lists *alternative* responses. ``chosen_layout="auto"`` reads a row as
alternatives when ``chosen`` or ``rejected`` holds several assistant messages with no other turn
between them, or a list of plain strings, or when the row has the flat layout's ``source_chosen`` /
``target_chosen`` columns; anything else is one TRL completion (K = 2).

Each response k of a group becomes a row ``{"prompt", "chosen": y_k, "rejected": y_k}``, so that
TRL's ``_prepare_dataset`` (prompt extraction, EOS, chat template, tokenization, dropping prompts
that fill ``max_length``) tokenizes it exactly as ``DPOTrainer`` tokenizes a pair; the K rows are
then put back together: one prompt (the shortest tokenized prompt prefix of the K, which is what
TRL does for a pair) and K responses, truncated to ``max_length`` with the prompt as TRL's collator
truncates (keep the start).
"""

from __future__ import annotations

from collections import defaultdict

import datasets

LAYOUTS = ("auto", "alternatives", "completion")
_GROUP, _K, _NUM_CHOSEN = "_wrpo_group", "_wrpo_k", "_wrpo_num_chosen"


def _is_message(x) -> bool:
    return isinstance(x, dict) and "role" in x and "content" in x


def _alternatives(value) -> bool:
    """A list of alternative responses: plain strings, or several assistant messages (no other turn)."""
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, str) for v in value):
        return True
    return len(value) >= 2 and all(_is_message(v) and v["role"] == "assistant" for v in value)


def detect_layout(example: dict) -> str:
    """'alternatives' (released or flat WRPO layout) or 'completion' (TRL's pair), from one row."""
    if "source_chosen" in example or "target_chosen" in example:
        return "alternatives"
    if _alternatives(example.get("chosen")) or _alternatives(example.get("rejected")):
        return "alternatives"
    return "completion"


READINGS = {
    "alternatives": "a list in `chosen` as alternative responses per prompt (WRPO: sources first, the target "
    "last; K = chosen + rejected)",
    "completion": "`chosen` / `rejected` as one completion each (TRL preference pairs, K = 2; a list of "
    "messages is one conversation)",
}


def layout_message(dataset_name: str, layout: str, requested: str) -> str:
    """Which reading of the data was used, how it was chosen, and how to select the other one."""
    other = "completion" if layout == "alternatives" else "alternatives"
    how = "detected from its first row" if requested == "auto" else f"chosen_layout={requested!r}"
    return (
        f"WRPOTrainer: {dataset_name} dataset read with {READINGS[layout]} ({how}); "
        f"chosen_layout={other!r} reads {READINGS[other]}"
    )


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _responses(example: dict, layout: str, row: int) -> tuple[list, int]:
    """(responses, num_chosen): chosen ones first (sources, then the target), then the rejected."""
    if layout == "completion":
        for key in ("chosen", "rejected"):
            if key not in example:
                raise ValueError(f"row {row}: missing column {key!r}")
        return [example["chosen"], example["rejected"]], 1
    if "source_chosen" in example or "target_chosen" in example:
        chosen = [*_as_list(example["source_chosen"]), example["target_chosen"]]
    else:
        chosen = _as_list(example["chosen"])
    rejected = _as_list(example["rejected"])
    if not chosen or not rejected:
        raise ValueError(f"row {row}: needs at least one chosen and one rejected response")
    return chosen + rejected, len(chosen)


def _conversational(value) -> bool:
    return (isinstance(value, list) and bool(value) and _is_message(value[0])) or _is_message(value)


def _normalise(prompt, responses):
    """Prompt and responses in one TRL format: all conversational (lists of messages) or all text."""
    if not any(_conversational(x) for x in (prompt, *responses)):
        return prompt, responses
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif _is_message(prompt):
        prompt = [prompt]
    out = []
    for y in responses:
        if isinstance(y, str):
            y = [{"role": "assistant", "content": y}]
        elif _is_message(y):
            y = [y]
        out.append(y)
    return prompt, out


def expand_to_pairs(dataset: datasets.Dataset, layout: str) -> datasets.Dataset:
    """One row per response: {prompt, chosen = rejected = y_k} + its group, index and num_chosen."""
    rows = []
    K = None
    for i, example in enumerate(dataset):
        responses, num_chosen = _responses(example, layout, i)
        if K is None:
            K = len(responses)
        elif len(responses) != K:
            raise ValueError(
                f"row {i} has {len(responses)} responses ({num_chosen} chosen) but row 0 has {K}: every "
                "group needs the same number of responses"
            )
        prompt, responses = _normalise(example.get("prompt"), responses)
        for k, y in enumerate(responses):
            row = {"chosen": y, "rejected": y, _GROUP: i, _K: k, _NUM_CHOSEN: num_chosen}
            if prompt is not None:
                row["prompt"] = prompt
            rows.append(row)
    return datasets.Dataset.from_list(rows)


def regroup(tokenized: datasets.Dataset, max_length: int | None) -> datasets.Dataset:
    """TRL-tokenized per-response rows -> groups {prompt_ids, responses [K], num_chosen}."""
    cols = tokenized.select_columns([_GROUP, _K, _NUM_CHOSEN, "prompt_ids", "chosen_ids"]).to_dict()
    parts = defaultdict(dict)
    num_chosen = {}
    for g, k, c, p, y in zip(
        *(cols[n] for n in (_GROUP, _K, _NUM_CHOSEN, "prompt_ids", "chosen_ids")), strict=True
    ):
        parts[g][k] = (p, y)
        num_chosen[g] = c
    K = max((len(v) for v in parts.values()), default=0)
    out = {"prompt_ids": [], "responses": [], "num_chosen": []}
    for g in sorted(parts):
        if len(parts[g]) < K:  # TRL dropped the prompt (it fills max_length): drop the whole group
            continue
        pieces = [parts[g][k] for k in range(K)]
        P = min(len(p) for p, _ in pieces)
        full = [list(p) + list(y) for p, y in pieces]
        out["prompt_ids"].append(full[0][:P])
        out["responses"].append([ids[P:max_length] for ids in full])
        out["num_chosen"].append(num_chosen[g])
    return datasets.Dataset.from_dict(out)
