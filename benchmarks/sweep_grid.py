"""The sweep's grids: layouts (K, chosen), vocabularies and token counts per machine, and the
configurations they expand to."""

from __future__ import annotations

import argparse

LAYOUTS = {"K2": (2, 1), "K3": (3, 2), "K4-2c2r": (4, 2), "K4-3c1r": (4, 3)}  # name -> (K, chosen)
LAYOUT_TEXT = {
    "K2": "K=2: 1 chosen, 1 rejected",
    "K3": "K=3: 2 chosen (source, target), 1 rejected",
    "K4-2c2r": "K=4: 2 chosen (source, target), 2 rejected",
    "K4-3c1r": "K=4: 3 chosen (2 sources, target), 1 rejected",
}
OPTIONAL = "optional"  # a key of a panel's dict: no time is kept back for it
# On the CPU, torch.compile runs on the main panel only: each process compiles again. This text is
# what the results file records as the reason.
NO_COMPILE = {
    "naive-compile": "the CPU grid compiles on the K3, V=32768 panel only: a compile per process "
    "(the timing one and each memory child) would not fit the 15 minutes"
}
# Grids: (layout, V, tokens[, {method: why not run}]) panels. Configurations run smallest work (N V H)
# first, so that a time budget cuts the largest; the CPU grid runs in the order listed instead: the
# configurations that span each axis first (tokens 768 to 12288, the four layouts, the two
# vocabularies), then the other token counts, then the K = 2 and K = 4 layouts at 768 tokens, OPTIONAL
# ones (the time budget keeps no time back for them when it weighs naive-compile). Token counts are
# multiples of 48, so that B = 4 prompts x K responses divide them for K = 2, 3 and 4. The CPU memory
# cap is set so that naive stops inside the K3, V=32768 token range (its over-cap rows in
# benchmarks/results/sweep_cpu.json), not before it.
GRIDS = {
    "cpu": {
        "H": 256,
        "dtype": "fp32",
        "B": 4,
        "reps": 3,
        "mem_cap_gb": 2.75,
        "time_budget": 760.0,
        "order": "listed",
        "panels": [
            ("K3", 32768, (768, 3072, 12288)),
            *[(lay, 32768, (3072,), NO_COMPILE) for lay in ("K4-2c2r", "K4-3c1r", "K2")],
            ("K3", 131072, (768, 3072), NO_COMPILE),
            ("K3", 32768, (1536, 6144)),
            *[(lay, 32768, (768,), {**NO_COMPILE, OPTIONAL: ""}) for lay in ("K2", "K4-2c2r", "K4-3c1r")],
        ],
    },
    "gpu": {
        "H": 4096,
        "dtype": "bf16",
        "B": 4,
        "reps": 5,
        "mem_cap_gb": None,
        "time_budget": None,
        "panels": [
            *[("K3", V, (3072, 6144, 12288, 24576, 49152)) for V in (32000, 128256, 262144)],
            *[(lay, V, (3072, 12288, 49152)) for lay in LAYOUTS if lay != "K3" for V in (32000, 128256)],
        ],
    },
    "tiny": {
        "H": 16,
        "dtype": "fp32",
        "B": 1,
        "reps": 1,
        "mem_cap_gb": 1.0,
        "time_budget": None,
        "panels": [*[(lay, 96, (24, 48)) for lay in LAYOUTS], ("K3", 160, (24, 48))],
    },
}
METHODS = {
    "cpu": "naive-eager,naive-compile,wrpo-torch,trl-chunked,liger-dpo/k2,gemm-only",
    "cuda": "naive-eager,naive-compile,wrpo-triton,cce-logps,trl-chunked,liger-dpo/k2,gemm-only",
}


def ints(text) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(",") if x)


def layout_of(name: str) -> str:
    if name not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return name


def work(c: dict) -> int:
    """A configuration's work, N V H (the FLOPs up to a constant)."""
    return c["tokens"] * c["V"] * c["H"]


def make_configs(cli) -> list[dict]:
    """The grid's configurations, in order: dicts with the id, layout, K, C, V, H, B, T and N (tokens),
    and the methods the grid leaves out there (``not_in_grid``). ``cli``: the sweep's options."""
    grid = GRIDS[cli.grid]
    panels = grid["panels"]
    crossed = cli.layouts or cli.vocabs or cli.tokens
    if crossed:  # a cross product of the given lists (else the grid's)
        lays = cli.layouts or list(dict.fromkeys(p[0] for p in panels))
        vocabs = cli.vocabs or tuple(dict.fromkeys(p[1] for p in panels))
        tokens = cli.tokens or panels[0][2]
        panels = [(lay, V, tokens) for lay in lays for V in vocabs]
    configs = []
    for H in cli.hidden or (grid["H"],):
        for lay, V, tokens, *rest in panels:
            K, C = LAYOUTS[lay]
            for n in tokens:
                T = max(1, round(n / (cli.B * K)))
                N = cli.B * K * T
                configs.append(
                    {
                        "id": f"{lay}/V{V}/N{N}/H{H}",
                        "layout": lay,
                        "layout_text": LAYOUT_TEXT[lay],
                        "K": K,
                        "num_chosen": C,
                        "V": V,
                        "H": H,
                        "B": cli.B,
                        "T": T,
                        "tokens": N,
                        "not_in_grid": dict(rest[0]) if rest else {},
                    }
                )
    if grid.get("order") == "listed" and not (crossed or cli.hidden):
        return configs
    return sorted(configs, key=work)  # stable: the grid's order among equal work


def row_base(c: dict) -> dict:
    """The fields of a configuration every result row repeats (its id as ``config``)."""
    keys = ("id", "layout", "K", "num_chosen", "V", "H", "B", "T", "tokens")
    return {("config" if k == "id" else k): c[k] for k in keys}
