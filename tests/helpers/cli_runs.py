"""Command lines of the tiny ``wrpo train`` / ``wrpo sft`` runs the tests make.

``cli("train", QUIET, "--max_steps 2", output_dir=out)`` is ``["train", "--report_to", "none",
"--eval_rows", "0", "--max_steps", "2", "--output_dir", str(out)]``: the words as written (split at
spaces), then each keyword as ``--name value`` (the value through ``str``; paths and computed values),
so a test lists exactly the flags of its run; flags given after (``[*cli(...), *extra]``) win.
:func:`sample_rows` writes the first rows of the bundled sample data, a run's small dataset.
"""

from __future__ import annotations

from pathlib import Path

# no tracker, no held-out evaluation rows: what most tiny runs pass
QUIET = "--report_to none --eval_rows 0"


def cli(*words: str, **options) -> list[str]:
    """``words`` split at spaces, then ``"--name", str(value)`` for the ``options`` in order."""
    out = [word for text in words for word in text.split()]
    for name, value in options.items():
        out += [f"--{name}", str(value)]
    return out


def sample_rows(path: Path, n: int) -> Path:
    """Writes the first ``n`` rows of the bundled sample data (wrpo.train.tiny.SAMPLE_DATA) to ``path``."""
    from wrpo.train.tiny import SAMPLE_DATA

    path.write_text("".join(SAMPLE_DATA.read_text().splitlines(keepends=True)[:n]))
    return path
