"""SFT data: rows of TRL's SFT formats (and WRPO preference rows) -> examples -> token ids.

Rows are read as ``wrpo train`` reads them (:func:`wrpo.data.preference.iter_rows`: one JSON object
per JSONL line, per element of a JSON list, or per row of a directory saved with
``datasets.Dataset.save_to_disk``).
Each row is one of:

- language modeling ``{"text": T}``: no chat template; every token after the first is trained;
- conversational ``{"messages": [..., {"role": "assistant", ...}]}``: the last message, an assistant
  one, is the completion, the messages before it the prompt (ending with a user message); earlier
  assistant turns are context, not trained (TRL's SFTTrainer trains every token by default: a warning
  says how many rows have such turns);
- prompt-completion ``{"prompt": P, "completion": C}``: P a string, a message or a message list
  (:func:`wrpo.data.preference.parse_prompt`), C a string, an assistant message or a list of
  messages (its last assistant message);
- preference ``{"prompt": P, "chosen": ...}`` (``rejected`` optional) and every row ``wrpo train`` reads
  (released ``chosen`` list + ``rejected``, flat ``source_chosen``/``target_chosen``): the first chosen
  response, the source pick y_ws.

The keys decide, in this order: ``completion``, ``chosen``/``source_chosen``/``target_chosen``,
``messages``, ``text``; a key holding null counts as absent (a saved ``datasets`` directory has every
column in every row) and other keys are ignored. Rows of different formats may share a file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wrpo.data.preference import (
    DataError,
    PreferenceExample,
    RowProblem,
    TokenizedGroup,
    iter_rows,
    json_kind,
    parse_message,
    parse_preference_row,
    parse_prompt,
    parse_response,
    parse_responses,
    parse_text,
    plain_ids,
    prompt_limit,
    tokenize_example,
)

logger = logging.getLogger(__name__)

# row format -> what is trained, for the effective config
FORMATS = {
    "text": "every token after the first",
    "messages": "the last assistant turn",
    "prompt-completion": "",
    "preference": "the first chosen response",
}
ACCEPTED = (
    '{"text"}, {"messages"} (the last one an assistant message), {"prompt", "completion"}, '
    '{"prompt", "chosen"[, "rejected"]}, {"prompt", "source_chosen", "target_chosen"[, "rejected"]} '
    "(docs/training.md#wrpo-sft)"
)
_CHOSEN_KEYS = ("chosen", "source_chosen", "target_chosen")


@dataclass(frozen=True)
class SFTExample:
    """One SFT example: ``prompt`` chat messages ending with a user message, or ``()`` for a plain-text
    (language modeling) row; ``completion`` the assistant text trained on, or the whole text of a
    plain-text row. ``format``: the row format it was read from (a key of ``FORMATS``; not compared; by
    default "text" without a prompt, else "prompt-completion")."""

    prompt: tuple[dict, ...]
    completion: str
    format: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.format:
            object.__setattr__(self, "format", "prompt-completion" if self.prompt else "text")


def load_sft_data(path: str | Path) -> list[SFTExample]:
    """All rows of ``path`` (``.jsonl``, ``.json`` list, or a saved ``datasets`` directory) as examples.

    Every row is validated before anything is returned; the first malformed one raises DataError
    ``"{path} line N: ..."`` (``row N`` in a JSON list or datasets directory). Conversations with
    assistant turns before the last one are logged once (a warning with their number)."""
    path = Path(path)
    examples: list[SFTExample] = []
    context_turns: list[str] = []  # where: messages rows with earlier assistant turns
    for where, row in iter_rows(path):
        try:
            ex = parse_sft_row(row)
        except RowProblem as e:
            raise DataError(f"{path} {where}: {e}") from None
        if ex.format == "messages" and any(m["role"] == "assistant" for m in ex.prompt):
            context_turns.append(where)
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no rows")
    if context_turns:
        logger.warning(
            "%s: %d of %d rows (first: %s) are conversations with assistant turns before the last one: "
            "wrpo sft trains only the last assistant message of each, the earlier ones are context "
            "(TRL's SFTTrainer trains every token by default); to train every turn, give one row per "
            "assistant turn",
            path,
            len(context_turns),
            len(examples),
            context_turns[0],
        )
    return examples


def parse_sft_row(row: Any) -> SFTExample:
    """One row of any accepted format (module docstring) as an example; RowProblem says what is wrong."""
    if not isinstance(row, Mapping):
        raise RowProblem(f"expected a JSON object, got {json_kind(row)}")
    if _has(row, "completion"):
        if not _has(row, "prompt"):
            raise RowProblem("'completion' without 'prompt' (a prompt-completion row needs both)")
        prompt = parse_prompt(row["prompt"])
        return SFTExample(prompt, parse_response(row["completion"], "completion"), "prompt-completion")
    if any(_has(row, key) for key in _CHOSEN_KEYS):
        return _preference(row)
    if _has(row, "messages"):
        return _messages(row["messages"])
    if _has(row, "text"):
        return SFTExample((), parse_text(row["text"], "text"), "text")
    keys = ", ".join(repr(k) for k in row if row[k] is not None) or "none"
    raise RowProblem(f"no SFT format matches the keys found ({keys}); accepted rows: {ACCEPTED}")


def as_sft_example(ex: SFTExample | PreferenceExample) -> SFTExample:
    """``ex``, a preference example read as SFT: its prompt and first chosen response (y_ws)."""
    if isinstance(ex, PreferenceExample):
        return SFTExample(ex.prompt, ex.chosen[0], "preference")
    return ex


def describe_formats(examples: Iterable[SFTExample | PreferenceExample]) -> str:
    """E.g. ``"20 messages (the last assistant turn), 10 text (every token after the first)"``."""
    counts = Counter(as_sft_example(ex).format for ex in examples)
    return ", ".join(
        f"{n} {name} ({FORMATS[name]})" if FORMATS.get(name) else f"{n} {name}"
        for name, n in counts.most_common()
    )


def _has(row: Mapping, key: str) -> bool:
    return row.get(key) is not None


def _preference(row: Mapping) -> SFTExample:
    if _has(row, "rejected"):  # a full preference row: checked exactly as `wrpo train` checks it
        return as_sft_example(parse_preference_row(row))
    if not _has(row, "prompt"):
        raise RowProblem("missing key 'prompt'")
    prompt = parse_prompt(row["prompt"])
    if _has(row, "source_chosen") or _has(row, "target_chosen"):
        for key in ("source_chosen", "target_chosen"):
            if not _has(row, key):
                raise RowProblem(f"missing key {key!r}")
        chosen = parse_responses(row["source_chosen"], "source_chosen")
        parse_response(row["target_chosen"], "target_chosen")
    else:
        chosen = parse_responses(row["chosen"], "chosen")
    return SFTExample(prompt, chosen[0], "preference")


def _messages(value: Any) -> SFTExample:
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else json_kind(value)
        raise RowProblem(f"messages: expected a list of messages ending with an assistant one, got {what}")
    messages = [parse_message(m, f"messages[{i}]") for i, m in enumerate(value)]
    *prompt, last = messages
    if last["role"] != "assistant":
        raise RowProblem(
            f"messages: the last message must be an assistant message (the completion trained on), "
            f"got role {last['role']!r}"
        )
    if not any(m["role"] == "user" for m in prompt):
        raise RowProblem("messages: no user message before the last (assistant) message")
    if prompt[-1]["role"] != "user":
        raise RowProblem(
            "messages: the message before the last one must be a user message, "
            f"got role {prompt[-1]['role']!r}"
        )
    return SFTExample(parse_prompt(prompt), last["content"], "messages")


def tokenize_sft_example(
    ex: SFTExample | PreferenceExample,
    tokenizer: Any,
    *,
    max_length: int = 2048,
    max_prompt_length: int | None = None,
) -> TokenizedGroup:
    """Token ids of one SFT example: a group of one response.

    Chat rows: :func:`wrpo.data.preference.tokenize_example` on the prompt with the completion as its only
    response (the same template, EOS and truncation rules as ``wrpo train``). Plain-text rows (prompt
    ``()``): ``tokenizer(text)`` (with the special tokens the tokenizer adds) + EOS unless it ends with
    one, the first ``max_length`` ids kept; the first id is the prompt, the rest the response, so every
    token after the first is trained (TRL's language-modeling loss).
    """
    ex = as_sft_example(ex)
    if ex.prompt:
        one = PreferenceExample(prompt=ex.prompt, chosen=(ex.completion,), rejected=())
        return tokenize_example(one, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    prompt_limit(max_length, max_prompt_length)  # the same checks of the pair (so max_length >= 2)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token")
    ids = plain_ids(tokenizer(ex.completion))
    if not ids or ids[-1] != eos:
        ids.append(eos)
    ids = ids[:max_length]
    if len(ids) < 2:
        raise ValueError(
            f"a text row tokenizes to {len(ids)} id(s): nothing to train ({ex.completion[:40]!r})"
        )
    return TokenizedGroup(prompt_ids=tuple(ids[:1]), responses=(tuple(ids[1:]),))
