"""``wrpo data split``: prompts 1/3 for SFT, 2/3 for preference optimisation (docs/method.md §1).

Rows are any JSON objects (prompt rows, sample rows, built quadruples). ``round(n * sft_fraction)`` rows
drawn with ``random.Random(seed)`` go to ``sft.jsonl``, the others to ``pref.jsonl``; each part keeps
the input's order. Rows with a ``prompt_id`` must not repeat it, so the parts share no prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from wrpo.data.construct.jsonl import atomic_outputs, read_rows
from wrpo.data.preference import DataError


def split_indices(n: int, sft_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(sft, pref): disjoint sorted indices covering range(n), ``round(n * sft_fraction)`` of them sft."""
    if not 0.0 <= sft_fraction <= 1.0:
        raise ValueError(f"--sft-fraction must be in [0, 1], got {sft_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_sft = round(n * sft_fraction)
    return sorted(order[:n_sft]), sorted(order[n_sft:])


def split(
    input_path: str | Path, out_dir: str | Path, *, sft_fraction: float = 1 / 3, seed: int = 42
) -> dict[Path, int]:
    """Writes ``out_dir/sft.jsonl`` and ``out_dir/pref.jsonl`` (both or neither); returns {path: rows}."""
    rows = read_rows(input_path)
    first_line: dict = {}
    for n, row in rows:
        pid = row.get("prompt_id")
        if pid is None:
            continue
        key = json.dumps(pid)
        if key in first_line:
            raise DataError(
                f"{input_path} line {n}: duplicate prompt_id {pid!r} (first on line {first_line[key]})"
            )
        first_line[key] = n
    sft, pref = split_indices(len(rows), sft_fraction, seed)
    paths = Path(out_dir) / "sft.jsonl", Path(out_dir) / "pref.jsonl"
    with atomic_outputs(*paths) as files:
        for f, part in zip(files, (sft, pref), strict=True):
            f.writelines(json.dumps(rows[i][1], ensure_ascii=False) + "\n" for i in part)
    return {paths[0]: len(sft), paths[1]: len(pref)}
