"""JSONL in and out: rows with their line numbers, and outputs that appear only when complete.

A failed check raises ``DataError("FILE line N: what is wrong")`` (as ``wrpo.data.preference``).
Outputs are written to a hidden temporary file next to the target and renamed over it (``os.replace``)
once everything is written: an exception (Ctrl-C included) removes the temporary file, so no half
file ever sits under the output's name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from wrpo.data.preference import DataError, json_kind, json_lines, read_utf8


class RowError(Exception):
    """What is wrong with one row; ``rows_of`` adds the file and line."""


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line of a JSONL file; each row must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for n, row in json_lines(path, read_utf8(path).split("\n")):
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {json_kind(row)}")
        rows.append((n, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


@contextmanager
def at_line(path: str | Path, n: int) -> Iterator[None]:
    """Turns a RowError raised inside into ``DataError("{path} line {n}: ...")``."""
    try:
        yield
    except RowError as e:
        raise DataError(f"{path} line {n}: {e}") from None


def get(row: dict, key: str, kind: type | tuple[type, ...] | None = None, where: str = "") -> Any:
    """``row[key]``, checked to be present and of a JSON ``kind`` (str, list, dict, int, ...) if given."""
    name = f"{where}.{key}" if where else key
    if key not in row:
        raise RowError(f"missing key {name!r}")
    value = row[key]
    if kind is None:
        return value
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise RowError(f"{name}: expected {_names(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise RowError(f"{name}: expected {_names(kind)}, got {json_kind(value)}")
    return value


def number(value: Any, where: str) -> float:
    """A finite JSON number (not a boolean)."""
    if value is None:
        raise RowError(f"{where} is null (not scored yet? run `wrpo data score`)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(f"{where}: expected a number, got {json_kind(value)}")
    if not math.isfinite(value):
        raise RowError(f"{where}: expected a finite number, got {value}")
    return float(value)


def _names(kind: type | tuple[type, ...]) -> str:
    names = {str: "text", list: "a list", dict: "an object", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


# ---- writing -----------------------------------------------------------------------------------------------


@contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[list[TextIO]]:
    """Text files to write ``paths`` through; all are renamed into place together on success.

    Each is a temporary ``.{name}.*.part`` in the target's directory (created if needed); on any
    exception every temporary file is removed and existing outputs are left as they were.
    """
    temps: list[tuple[TextIO, Path, Path]] = []
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
            temps.append((os.fdopen(fd, "w", encoding="utf-8"), Path(tmp), path))
        yield [f for f, _, _ in temps]
        for f, tmp, _ in temps:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain open() would give
        for _, tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for f, tmp, _ in temps:
            f.close()
            tmp.unlink(missing_ok=True)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Writes ``rows`` (one JSON object a line) to ``path`` atomically; returns how many."""
    n = 0
    with atomic_outputs(path) as (f,):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
