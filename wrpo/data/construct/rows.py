"""The row formats of data construction, validated with ``FILE line N: what is wrong``.

- prompt rows: ``{"prompt_id": ID, "prompt": P}``
- sample rows: ``{"prompt_id": ID, "prompt": P, "responses": [{"model": M, "text": T, "score": S}, ...]}``

ID is text or an integer, unique in a file; P is a prompt as ``wrpo.data.preference`` reads it (a string, a
message or a list of messages ending with a user message). ``score`` is a number, or null/absent
before ``wrpo data score`` fills it. Other keys are kept and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wrpo.data.construct.jsonl import RowError, at_line, get, number, read_rows
from wrpo.data.preference import DataError, RowProblem, json_kind, parse_prompt


@dataclass(frozen=True)
class Response:
    """One sampled response; ``score`` None before scoring, ``model`` None when the row names none."""

    text: str
    score: float | None
    model: str | None


@dataclass(frozen=True)
class SampleRow:
    """One validated row: ``messages`` is the parsed prompt (None when the row has none), ``row`` the raw
    JSON object."""

    line: int
    prompt_id: str | int
    messages: tuple[dict, ...] | None
    responses: tuple[Response, ...]
    row: dict


def read_sample_rows(
    path: str | Path,
    *,
    need_prompt: bool = True,
    need_responses: bool = True,
    need_model: bool = False,
    need_score: bool = False,
) -> list[SampleRow]:
    """Every row of ``path``, checked; prompt_ids must be unique within the file."""
    out: list[SampleRow] = []
    first_line: dict[str | int, int] = {}
    for n, row in read_rows(path):
        with at_line(path, n):
            pid = get(row, "prompt_id", (str, int))
            if isinstance(pid, str) and not pid.strip():
                raise RowError("prompt_id is an empty string")
            if pid in first_line:
                raise RowError(f"duplicate prompt_id {pid!r} (first on line {first_line[pid]})")
            first_line[pid] = n
            messages = None
            if need_prompt or "prompt" in row:
                messages = prompt_messages(get(row, "prompt"))
            responses = ()
            if need_responses:
                responses = _responses(get(row, "responses", list), need_model, need_score)
            out.append(SampleRow(n, pid, messages, responses, row))
    return out


def prompt_messages(value: Any) -> tuple[dict, ...]:
    """The chat messages of a prompt (string, message or list of messages), as preference rows read them."""
    try:
        return parse_prompt(value)
    except RowProblem as e:
        raise RowError(str(e)) from None


def _responses(items: list, need_model: bool, need_score: bool) -> tuple[Response, ...]:
    if not items:
        raise RowError("responses is an empty list")
    out = []
    for i, item in enumerate(items):
        where = f"responses[{i}]"
        if not isinstance(item, dict):
            raise RowError(
                f"{where}: expected an object {{'text': ..., 'score': ...}}, got {json_kind(item)}"
            )
        text = get(item, "text", str, where)
        model = get(item, "model", str, where) if need_model or "model" in item else None
        if model is not None and not model.strip():
            raise RowError(f"{where}.model is an empty string")
        score = item.get("score")
        if need_score:
            if "score" not in item:
                raise RowError(f"missing key '{where}.score' (run `wrpo data score` first)")
            score = number(score, f"{where}.score")
        elif score is not None:
            score = number(score, f"{where}.score")
        out.append(Response(text, score, model))
    return tuple(out)


def check_same_prompt(a: SampleRow, a_path: str | Path, b: SampleRow, b_path: str | Path) -> None:
    """Rows of one prompt_id in two files must hold the same prompt when both hold one."""
    if a.messages is not None and b.messages is not None and a.messages != b.messages:
        raise DataError(
            f"{b_path} line {b.line}: prompt_id {b.prompt_id!r} has another prompt in {a_path} line {a.line}"
        )
