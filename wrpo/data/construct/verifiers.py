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
    return float(final_number(response) == _reference(row))


def _reference(row: dict) -> float:
    """``row["answer"]`` as a number (a number, or text holding one); ValueError when absent or none."""
    if "answer" not in row:
        raise ValueError("the row has no 'answer' (the reference the response is checked against)")
    reference = row["answer"]
    if isinstance(reference, int | float) and not isinstance(reference, bool):
        return float(reference)
    found = final_number(str(reference))
    if found is None:
        raise ValueError(f"'answer' {row['answer']!r} holds no number")
    return found


# "a op b = c", also inside a chain ("3 * 4 = 12 + 5 = 17" holds two): a lookahead finds overlapping
# equations, the lookbehind keeps "a" a whole number (not the tail of "12" or of "1.5")
_OPERAND = r"(-?\d+(?:\.\d+)?)"
_EQUATION = re.compile(rf"(?<![\d.])(?={_OPERAND}\s*([-+*/×x])\s*{_OPERAND}\s*=\s*{_OPERAND})")
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "x": lambda a, b: a * b,
    "×": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else None,
}


def equation_steps(text: str) -> tuple[int, int]:
    """(true, written): the "a op b = c" equations in ``text`` (op one of + - * x × /) and how many of
    them are arithmetically true (to 1e-9 relative; a division by 0 is false)."""
    true = written = 0
    for a, op, b, c in _EQUATION.findall(text):
        value = _OPS[op](float(a), float(b))
        written += 1
        true += value is not None and abs(value - float(c)) <= 1e-9 * max(1.0, abs(float(c)))
    return true, written


def arithmetic_graded(prompt: list[dict], response: str, row: dict) -> float:
    """A continuous arithmetic reward in [0, 1]: 1.0 for a correct final answer, less for any wrong one.

    With ``x`` the last number of ``response`` (as :func:`arithmetic_exact_match` reads it) and
    ``r = row["answer"]``::

        score = 1.0                                    if x == r
              = 0.5 * closeness + 0.4 * steps          otherwise, where
        closeness = 1 / (1 + |x - r| / max(|r|, 1))     (0 when the response has no number)
        steps     = true / written                      ("a op b = c" equations of the response that
                                                         are arithmetically true; 0 when none written)

    So a wrong answer scores below 0.9 (< 1.0, the correct one), and a response with no number scores
    0.0 (it has no equation either); between two wrong answers with the same steps, the nearer one
    scores higher (closeness falls with the relative error); a correct first step of two
    ("3 * 4 = 12. 12 + 5 = 18.") adds 0.2. ``row["answer"]`` as for ``arithmetic_exact_match``
    (ValueError when missing or holding no number)."""
    reference = _reference(row)
    x = final_number(response)
    if x is None:
        return 0.0
    if x == reference:
        return 1.0
    closeness = 1.0 / (1.0 + abs(x - reference) / max(abs(reference), 1.0))
    true, written = equation_steps(response)
    return 0.5 * closeness + 0.4 * (true / written if written else 0.0)
