"""``make zoo``: every causal-LM architecture of transformers' registry in every layout -> the matrix.

Writes ``wrpo/assets/verified_layouts.json`` (what the layout plan reads at run time) and renders
``docs/models.md`` from it. ``--only NAME ...`` re-checks some architectures and merges them into the
existing table; ``--render`` only re-renders the page. Run from the repo root:
``PYTHONPATH=tests python -m zoo``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import transformers

from wrpo.model.layout import LAYOUTS, VERIFIED_LAYOUTS

from .architectures import registry_names
from .conformance import EXACT, check_one
from .render import DOC, render

torch.set_num_threads(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="architectures to re-check (merged into the table)")
    parser.add_argument("--render", action="store_true", help="only re-render docs/models.md")
    args = parser.parse_args(argv)
    table = json.loads(VERIFIED_LAYOUTS.read_text()) if VERIFIED_LAYOUTS.exists() else {}
    if not args.render:
        names = args.only or registry_names()
        start = time.perf_counter()
        results = dict(map(check_one, names))
        models = {} if not args.only else dict(table.get("models", {}))
        skipped = {} if not args.only else dict(table.get("skipped", {}))
        for name, result in results.items():
            models.pop(name, None), skipped.pop(name, None)
            (skipped if isinstance(result, str) else models)[name] = result
        table = {
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "exact_below": EXACT,
            "layouts": list(LAYOUTS),
            "models": dict(sorted(models.items())),
            "skipped": dict(sorted(skipped.items())),
        }
        VERIFIED_LAYOUTS.write_text(json.dumps(table, indent=1) + "\n")
        print(f"{len(names)} architectures in {time.perf_counter() - start:.0f} s -> {VERIFIED_LAYOUTS}")
    DOC.write_text(render(table))
    print(f"rendered {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
