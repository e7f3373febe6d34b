"""Preference data: read and validate rows, then tokenize each group (docs/method.md §1).

Row layouts (one JSON object per JSONL line, per element of a JSON list, or per row of a directory
saved with ``datasets.Dataset.save_to_disk``):

- released WRPO: ``{"prompt": P, "chosen": [y_ws, y_wt], "rejected": [y_l]}``
- flat: ``{"prompt": P, "source_chosen": y | [y, ...], "target_chosen": y, "rejected": y | [y, ...]}``

P is a string (one user message), a message ``{"role": ..., "content": ...}`` or a list of messages
ending with a user message. A response y is a plain string (the assistant's text), an assistant
message, or a list of messages (its last assistant message counts): ``"chosen": ["7 + 8 = 15.", "15"]``
works as well as assistant messages. ``chosen``/``rejected`` given as a single response (not in a
list) count as one response, e.g. DPO pairs ``{"prompt": P, "chosen": y, "rejected": y}``. Every row
needs the same numbers of chosen and rejected responses; a single response where the other rows have
a list is reported as such. ``wrpo sft`` reads these rows and TRL's SFT formats (``wrpo.data.sft``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets


class DataError(ValueError):
    """A malformed data file: ``"{path} line {n}: ..."`` (JSONL), ``"{path} row {n}: ..."`` (JSON list,
    datasets directory; n = index + 1) or ``"{path}: ..."`` (the file as a whole)."""


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt and its responses: ``prompt`` chat messages ``{"role", "content"}`` ending with a user
    message; ``chosen`` assistant texts, sources first and the target last; ``rejected`` assistant texts."""

    prompt: tuple[dict, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]


@dataclass(frozen=True)
class TokenizedGroup:
    """Token ids of one group: the templated prompt (ending with the generation prompt) and its K responses
    (chosen first, then rejected), each ending with EOS unless truncation cut it."""

    prompt_ids: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]


class RowProblem(Exception):
    """What is wrong with one row (the caller adds path and line)."""


# ---- reading -----------------------------------------------------------------------------------------------


def load_preference_data(path: str | Path, *, num_chosen: int | None = None) -> list[PreferenceExample]:
    """All rows of ``path`` (``.jsonl``, ``.json`` list, or a saved ``datasets`` directory) as examples.

    Every row is validated before anything is returned; the first malformed one raises DataError naming
    its line (row). All rows must have the same numbers of chosen and rejected responses, and exactly
    ``num_chosen`` chosen ones when it is given.
    """
    if num_chosen is not None and num_chosen < 1:
        raise ValueError(f"num_chosen must be >= 1, got {num_chosen}")
    path = Path(path)
    examples: list[PreferenceExample] = []
    first: tuple[str, Any, tuple[int, int]] | None = None  # where, row, (n_chosen, n_rejected)
    for where, row in iter_rows(path):
        try:
            ex = parse_preference_row(row)
            counts = len(ex.chosen), len(ex.rejected)
            if num_chosen is not None and counts[0] != num_chosen:
                raise RowProblem(f"{counts[0]} chosen responses, expected num_chosen={num_chosen}")
            if first is None:
                first = (where, row, counts)
            elif counts != first[2]:
                where, problem = _count_problem(where, row, counts, *first)
                raise problem
        except RowProblem as e:
            raise DataError(f"{path} {where}: {e}") from None
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of a ``.jsonl`` file, a ``.json`` list or a saved ``datasets`` directory, in file
    order, where = ``"line n"`` or ``"row n"``; a missing or empty file, broken JSON or a byte that is not
    UTF-8 raises DataError (naming the line)."""
    path = Path(path)
    if path.is_dir():
        yield from ((f"row {i}", row) for i, row in enumerate(_load_dataset_dir(path), 1))
        return
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported format, expected .jsonl, .json or a saved datasets directory")
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        yield from ((f"row {i}", row) for i, row in enumerate(rows, 1))
        return
    # a .json file not holding a list is read as JSONL
    yield from ((f"line {n}", row) for n, row in json_lines(path, text.split("\n")))


def read_utf8(path: Path) -> str:
    """The text of ``path``; a byte that is not UTF-8 raises DataError naming its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path} line {line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 ({e.reason}); "
            "save the file as UTF-8"
        ) from None


def json_lines(path: Path, lines) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of the non-blank ``lines`` of JSONL file ``path``; broken JSON
    raises DataError naming its line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: invalid JSON ({e.msg})") from None


def _load_dataset_dir(path: Path) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a directory saved with datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    return ds


def _count_problem(
    where: str, row, counts, first_where: str, first_row, first_counts
) -> tuple[str, RowProblem]:
    """-> (where, problem) for a row whose numbers of responses differ from the first row's: a response
    given alone where the other row has a list is named as such, on its own line."""
    if problem := _single_response_problem(row, counts, first_counts, first_where):
        return where, problem
    if problem := _single_response_problem(first_row, first_counts, counts, where):
        return first_where, problem
    return where, RowProblem(
        f"{counts[0]} chosen and {counts[1]} rejected responses, but {first_where} has "
        f"{first_counts[0]} and {first_counts[1]} (all rows need the same K)"
    )


def _single_response_problem(row: Mapping, counts, expected, source: str) -> RowProblem | None:
    """The problem of ``row`` giving chosen or rejected as one response (not a list) where ``expected``
    (the counts of row or line ``source``) has more; None if it does not."""
    chosen_key = "source_chosen" if _is_flat(row) else "chosen"
    for key, n, want in zip((chosen_key, "rejected"), counts, expected, strict=True):
        if want > n and not isinstance(row[key], list):
            side = "chosen" if key != "rejected" else "rejected"
            return RowProblem(
                f"{key!r} is {json_kind(row[key])}, but a list of responses was expected ({source} has "
                f"{want} {side}); the expected layout: {_layout(row, *expected)}, a response being "
                "text or an assistant message"
            )
    return None


def _layout(row: Mapping, n_chosen: int, n_rejected: int) -> str:
    """The row layout of ``row``'s kind with these numbers of responses, e.g. for a message."""

    def items(n):
        return "[" + ", ".join(["response"] * n) + "]"

    if _is_flat(row):
        chosen = f'"source_chosen": {items(n_chosen - 1)}, "target_chosen": response'
    else:
        chosen = f'"chosen": {items(n_chosen)}'
    return "{" + f'"prompt": ..., {chosen}, "rejected": {items(n_rejected)}' + "}"


# ---- validating one row ------------------------------------------------------------------------------------


def _is_flat(row: Mapping) -> bool:
    return row.get("source_chosen") is not None or row.get("target_chosen") is not None


def parse_preference_row(row: Any) -> PreferenceExample:
    """One preference row (released or flat layout) as an example; RowProblem says what is wrong."""
    if not isinstance(row, Mapping):
        raise RowProblem(f"expected a JSON object, got {json_kind(row)}")
    flat = _is_flat(row)
    keys = (
        ("prompt", "source_chosen", "target_chosen", "rejected") if flat else ("prompt", "chosen", "rejected")
    )
    for key in keys:
        if key not in row:
            raise RowProblem(f"missing key {key!r}")
    prompt = parse_prompt(row["prompt"])
    if flat:
        sources = parse_responses(row["source_chosen"], "source_chosen")
        chosen = (*sources, parse_response(row["target_chosen"], "target_chosen"))
    else:
        chosen = parse_responses(row["chosen"], "chosen")
    return PreferenceExample(
        prompt=prompt, chosen=chosen, rejected=parse_responses(row["rejected"], "rejected")
    )


def parse_prompt(value: Any) -> tuple[dict, ...]:
    """Chat messages of a prompt: a string (one user message), a message dict or a message list."""
    if isinstance(value, str):
        messages = ({"role": "user", "content": parse_text(value, "prompt")},)
    elif isinstance(value, Mapping):
        messages = (parse_message(value, "prompt"),)
    elif isinstance(value, list):
        messages = tuple(parse_message(m, f"prompt[{i}]") for i, m in enumerate(value))
    else:
        raise RowProblem(
            f"prompt: expected a string, a message or a list of messages, got {json_kind(value)}"
        )
    if not any(m["role"] == "user" for m in messages):
        raise RowProblem("prompt has no user message")
    if messages[-1]["role"] != "user":
        raise RowProblem(f"prompt must end with a user message, not a {messages[-1]['role']!r} one")
    return messages


def parse_responses(value: Any, key: str) -> tuple[str, ...]:
    """The texts of a response list ``row[key]`` (a single response counts as one)."""
    if not isinstance(value, list):
        return (parse_response(value, key),)
    if not value:
        raise RowProblem(f"{key} is an empty list")
    return tuple(parse_response(v, f"{key}[{i}]") for i, v in enumerate(value))


def parse_response(value: Any, where: str) -> str:
    """The assistant text of a response: a string, an assistant message or a list of messages (its last
    assistant message)."""
    if isinstance(value, str):
        return parse_text(value, where)
    if isinstance(value, Mapping):
        message = parse_message(value, where)
        if message["role"] != "assistant":
            raise RowProblem(f"{where}: expected an assistant message, got role {message['role']!r}")
        return message["content"]
    if isinstance(value, list):
        messages = [parse_message(m, f"{where}[{i}]") for i, m in enumerate(value)]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if not replies:
            raise RowProblem(f"{where}: no assistant message in the list")
        return replies[-1]
    raise RowProblem(f"{where}: expected text or an assistant message, got {json_kind(value)}")


def parse_message(value: Any, where: str) -> dict:
    """A chat message ``{"role": text, "content": text}`` (other keys dropped)."""
    if not isinstance(value, Mapping):
        raise RowProblem(
            f"{where}: expected a message {{'role': ..., 'content': ...}}, got {json_kind(value)}"
        )
    for key in ("role", "content"):
        if key not in value:
            raise RowProblem(f"{where}: message without {key!r}")
    return {
        "role": parse_text(value["role"], f"{where}.role"),
        "content": parse_text(value["content"], f"{where}.content"),
    }


def parse_text(value: Any, where: str) -> str:
    """A string that is not blank."""
    if not isinstance(value, str):
        raise RowProblem(f"{where}: expected text, got {json_kind(value)}")
    if not value.strip():
        raise RowProblem(f"{where} is an empty string")
    return value


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else type(value).__name__


# ---- tokenizing --------------------------------------------------------------------------------------------


def prompt_limit(max_length: int, max_prompt_length: int | None = None) -> int:
    """The prompt tokens kept when prompt + response is too long: ``max_prompt_length``, or by default
    the paper's share of ``max_length`` (1800 of 2048, so 900 of 1024). ValueError naming both
    options unless 0 < max_prompt_length < max_length."""
    if max_prompt_length is None:
        max_prompt_length = max(max_length * 1800 // 2048, 1)
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"--max_prompt_length {max_prompt_length} must be above 0 and below --max_length {max_length} "
            "(each response keeps at least one token)"
        )
    return max_prompt_length


def tokenize_example(
    ex: PreferenceExample, tokenizer: Any, *, max_length: int = 2048, max_prompt_length: int | None = None
) -> TokenizedGroup:
    """Token ids of one group under ``tokenizer``'s chat template.

    prompt: the template of ``ex.prompt`` with the generation prompt. Each response: the template of
    prompt + that assistant message minus the prompt's ids, cut after its last EOS (template tails
    such as a newline go), EOS appended if it has none; when the prompt's ids are not a prefix of the
    conversation's, ``tokenizer(text, add_special_tokens=False)`` + EOS instead.
    Truncation (as TRL's DPO, keep_end): if len(prompt) + len(longest response) > max_length, keep the
    last ``max_prompt_length`` prompt ids (:func:`prompt_limit`: by default 1800/2048 of max_length); if
    still too long, cut every response to ``max_length - len(prompt)`` ids (>= 1).
    """
    max_prompt_length = prompt_limit(max_length, max_prompt_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token")
    messages = list(ex.prompt)
    prompt = _template_ids(tokenizer, messages, add_generation_prompt=True)
    responses = []
    for text in (*ex.chosen, *ex.rejected):
        full = _template_ids(tokenizer, [*messages, {"role": "assistant", "content": text}])
        if len(full) > len(prompt) and full[: len(prompt)] == prompt:
            ids = full[len(prompt) :]
            ids = ids[: len(ids) - ids[::-1].index(eos)] if eos in ids else [*ids, eos]
        else:
            ids = [*plain_ids(tokenizer(text, add_special_tokens=False)), eos]
        responses.append(ids)
    longest = max(map(len, responses))
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
        if len(prompt) + longest > max_length:
            responses = [r[: max_length - len(prompt)] for r in responses]
    return TokenizedGroup(prompt_ids=tuple(prompt), responses=tuple(tuple(r) for r in responses))


def _template_ids(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return plain_ids(out)


def plain_ids(out: Any) -> list[int]:
    """A flat list of ints from a list or a BatchEncoding/dict (transformers 5 returns one by default)."""
    return [int(i) for i in (out["input_ids"] if isinstance(out, Mapping) else out)]
