"""``wrpo data prompts``: the prompt rows ``{"prompt_id", "prompt"}`` of any data file with prompts.

E.g. the bundled sample data (released layout) -> a prompts file for ``wrpo data sample``. A row's own
``prompt_id`` is kept; rows without one get ``"{file stem}:{line}"``.
"""

from __future__ import annotations

from pathlib import Path

from wrpo.data.construct.jsonl import RowError, at_line, get, read_rows, write_jsonl
from wrpo.data.construct.rows import prompt_messages


def extract_prompts(input_path: str | Path, output: str | Path, *, limit: int | None = None) -> int:
    """Writes the prompt rows of the first ``limit`` rows (all by default) to ``output``; returns how many."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    input_path = Path(input_path)
    out, first_line = [], {}
    for n, row in read_rows(input_path)[:limit]:
        with at_line(input_path, n):
            prompt = get(row, "prompt")
            prompt_messages(prompt)
            pid = get(row, "prompt_id", (str, int)) if "prompt_id" in row else f"{input_path.stem}:{n}"
            if pid in first_line:
                raise RowError(f"duplicate prompt_id {pid!r} (first on line {first_line[pid]})")
            first_line[pid] = n
        out.append({"prompt_id": pid, "prompt": prompt})
    return write_jsonl(output, out)
