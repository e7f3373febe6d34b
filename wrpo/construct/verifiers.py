"""Rule-based rewards for ``wrpo data score --reward-fn MODULE:FUNCTION``.

A reward function is called once per response as ``FUNCTION(prompt, response, row) -> float``:
``prompt`` the row's prompt as chat messages (a list of ``{"role", "content"}`` dicts), ``response``
the response's text, ``row`` the whole sample row (a dict, e.g. with the ``answer`` a prompt row
carried through ``wrpo data sample``).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in ``text`` (integers and decimals, optional minus sign), else None."""
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def arithmetic_exact_match(prompt: list[dict], response: str, row: dict) -> float:
    """1.0 when the last number of ``response`` equals ``row["answer"]``, else 0.0.

    ``row["answer"]`` is the reference answer (a number, or text holding one)."""
    if "answer" not in row:
        raise ValueError("the row has no 'answer' (the reference the response is checked against)")
    reference = row["answer"]
    if not isinstance(reference, int | float) or isinstance(reference, bool):
        reference = final_number(str(reference))
        if reference is None:
            raise ValueError(f"'answer' {row['answer']!r} holds no number")
    return float(final_number(response) == float(reference))
