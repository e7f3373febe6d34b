"""The synthetic task: arithmetic word problems in three families, as prompt rows and solution rows.

Families (operands drawn per problem):

- ``addsub``: "What is the sum of 23 and 6?" / "What is the difference of 28 and 7?" (a in 10..99, b in
  1..9, no carry nor borrow)
- ``mul``: "What is three times 312?" (two or three times a in 10..9999 whose digits carry nothing)
- ``twostep``: "Add 5 to the product of 3 and 4." (a, b in 2..6, c in 1..9)

Every solution ends with "The answer is N."; the prompt rows carry the reference ``answer`` and
``family``. Train and held-out problems are disjoint: each distinct problem (family, operation,
operands) is assigned to one part only, deterministically for a seed. Every word used is a whole
token of the bundled tokenizer (``wrpo.train.tiny.WORDS``); digits and signs are single characters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FAMILIES = ("addsub", "mul", "twostep")


@dataclass(frozen=True)
class Problem:
    family: str
    question: str
    solution: str
    answer: int

    @property
    def key(self) -> str:
        return f"{self.family}:{self.question}"


def _addsub(a: int, b: int, op: str) -> Problem:
    if op == "+":
        q, ans = f"What is the sum of {a} and {b}?", a + b
    else:
        q, ans = f"What is the difference of {a} and {b}?", a - b
    return Problem("addsub", q, f"{a} {op} {b} = {ans}. The answer is {ans}.", ans)


def _mul(a: int, b: int) -> Problem:
    ans = a * b
    word = {2: "two", 3: "three"}[b]
    return Problem("mul", f"What is {word} times {a}?", f"{b} * {a} = {ans}. The answer is {ans}.", ans)


def _twostep(a: int, b: int, c: int) -> Problem:
    p = a * b
    ans = p + c
    return Problem(
        "twostep",
        f"Add {c} to the product of {a} and {b}.",
        f"{a} * {b} = {p}. {p} + {c} = {ans}. The answer is {ans}.",
        ans,
    )


def _no_carry(a: int, b: int) -> bool:
    return all(int(d) * b < 10 for d in str(a))


def all_problems(family: str) -> list[Problem]:
    """Every distinct problem of a family, in a fixed order."""
    if family == "addsub":
        sums = [_addsub(a, b, "+") for a in range(10, 100) for b in range(1, 10 - a % 10)]
        return sums + [_addsub(a, b, "-") for a in range(10, 100) for b in range(1, a % 10 + 1)]
    if family == "mul":
        return [_mul(a, b) for b in (2, 3) for a in range(10, 10000) if _no_carry(a, b)]
    if family == "twostep":
        return [_twostep(a, b, c) for a in range(2, 7) for b in range(2, 7) for c in range(1, 10)]
    raise ValueError(f"unknown family {family!r}, expected one of {FAMILIES}")


def split_problems(seed: int, held_out: int) -> tuple[dict, dict]:
    """({family: train problems}, {family: ``held_out`` problems}), disjoint, shuffled for ``seed``."""
    train, held = {}, {}
    for family in FAMILIES:
        problems = all_problems(family)
        random.Random(f"{seed}:{family}").shuffle(problems)
        held[family], train[family] = problems[:held_out], problems[held_out:]
    return train, held


def prompt_row(p: Problem, prompt_id: str) -> dict:
    """A prompt row for ``wrpo data sample`` with the reference answer the verifier reads."""
    return {"prompt_id": prompt_id, "prompt": p.question, "answer": p.answer, "family": p.family}


def sft_row(p: Problem) -> dict:
    """A released-layout row whose first chosen response is the correct solution (what ``wrpo sft`` fits)."""
    wrong = f"The answer is {p.answer + 1}."
    return {"prompt": p.question, "chosen": [p.solution], "rejected": [wrong]}
