"""``wrpo data score --reward-fn MODULE:FUNCTION``: scores from a Python function instead of a reward model.

``FUNCTION(prompt, response, row) -> float`` is called once per response, in file order: ``prompt`` the
row's prompt as chat messages (a list of ``{"role", "content"}`` dicts, however the row wrote it),
``response`` the response's text, ``row`` the sample row as a dict (every key, e.g. a reference
``answer``). It returns a finite number (int, float or a 0-d numeric value with ``float()``; not a bool).
``wrpo.data.construct.verifiers.arithmetic_exact_match`` is an example.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from wrpo.data.construct.jsonl import write_jsonl
from wrpo.data.construct.rows import read_sample_rows
from wrpo.data.preference import DataError

RewardFn = Callable[[list[dict], str, dict], float]


@contextlib.contextmanager
def _current_directory_on_path():
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def load_reward_fn(spec: str) -> RewardFn:
    """The function ``MODULE:FUNCTION`` names, e.g. ``wrpo.data.construct.verifiers:arithmetic_exact_match``;
    MODULE is looked up in the current directory too (as ``python -m`` does), then on ``sys.path``."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--reward-fn {spec!r}: expected MODULE:FUNCTION")
    try:
        with _current_directory_on_path():
            module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failed while importing
        raise ValueError(
            f"--reward-fn {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r}: module {module_name!r} has no function {name!r}")
    return fn


def score_with_function(input_path: str | Path, spec: str, output: str | Path | None = None) -> int:
    """Scores every response of ``input_path`` with ``spec``'s function and writes the rows to ``output``
    (default: in place); returns the number of responses scored. Nothing is written on an error."""
    fn = load_reward_fn(spec)
    rows = read_sample_rows(input_path)
    scored = []
    with tqdm(total=sum(len(r.responses) for r in rows), desc="scoring", unit="response") as bar:
        for row in rows:
            prompt = [dict(m) for m in row.messages]
            items = []
            for i, item in enumerate(row.row["responses"]):
                where = f"{input_path} line {row.line}: responses[{i}]: --reward-fn {spec}"
                items.append({**item, "score": _call(fn, prompt, item["text"], row.row, where)})
                bar.update()
            scored.append({**row.row, "responses": items})
    write_jsonl(output or input_path, scored)
    return bar.n


def _call(fn: RewardFn, prompt: list[dict], response: str, row: dict, where: str) -> float:
    try:
        value = fn(prompt, response, row)
    except Exception as e:  # the user's function: any failure is reported with the row
        raise DataError(f"{where} raised {type(e).__name__}: {e}") from e
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"{where} returned {value!r} ({type(value).__name__}), expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"{where} returned {value}, expected a finite number")
    return value
