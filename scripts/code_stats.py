"""Size figures of the checkout: Python lines per top-level folder, the largest files, ``fmt: skip`` markers.

Run from the repository root: ``python scripts/code_stats.py`` (reads the files git tracks)."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path


def tracked_python() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, check=True).stdout
    return [Path(p) for p in out.split()]


def main() -> None:
    files = tracked_python()
    lines = {p: len(p.read_text().splitlines()) for p in files}
    per_folder = Counter()
    for p, n in lines.items():
        per_folder[p.parts[0] if len(p.parts) > 1 else "."] += n
    print("python lines per top-level folder:")
    for folder, n in sorted(per_folder.items()):
        print(f"  {folder:14s} {n:6d}")
    print(f"  {'total':14s} {sum(lines.values()):6d} in {len(files)} files")
    print("largest files:")
    for p, n in sorted(lines.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {n:5d} {p}")
    marker = "# " + "fmt: skip"  # a line ending with it (this file names it without one)
    skips = sum(line.rstrip().endswith(marker) for p in files for line in p.read_text().splitlines())
    print(f"'fmt: skip' markers: {skips}")


if __name__ == "__main__":
    main()
