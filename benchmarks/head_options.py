"""The options of one head-loss comparison (shape, dtype, methods, rounds), typed, and their CLI.

``bench_head_loss.py`` reads them from its command line, ``sweep.py`` builds one per configuration;
both end in :func:`select_methods`, which drops the methods that cannot run here, saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch
from methods import DTYPES, EXTRA_METHODS, METHODS, shape_of, unavailable


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class HeadOptions:
    """One comparison: B prompts x K responses x T tokens, hidden H, vocabulary V (see methods.py)."""

    device: str = field(default_factory=default_device)
    B: int = 4
    T: int = 512
    H: int = 256
    V: int = 32768
    K: int = 3  # responses per prompt of the methods without /k2
    num_chosen: int | None = None  # of those K (default K - 1)
    gemm_rows: int | None = None  # gemm-only: rows per GEMM chunk (default all)
    dtype: str = "fp32"
    reps: int = 5
    warmup: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    compile_backend: str = "inductor"
    peak_tflops: float | None = None  # dense bf16 peak (default: known GPUs)
    time_budget: float | None = None  # seconds; methods not built by 45% of it are skipped
    no_check: bool = False
    memory_inproc: bool = False  # CPU: peak RSS in this process instead of a fresh one per method
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it does not run here

    def shape(self) -> dict:
        """The shape as results files record it."""
        K, C, _ = shape_of("", self)
        k = f"{K} (2 for /k2)" if K == 3 and C == 2 else f"{K}, {C} chosen (2, 1 chosen for /k2)"
        return {"B": self.B, "K": k, "T": self.T, "H": self.H, "V": self.V}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def select_methods(opts: HeadOptions, explicit: bool) -> None:
    """Move the methods that cannot run here from ``opts.methods`` to ``opts.skipped`` (with why). Not
    ``explicit`` (the default list) on CUDA also drops wrpo-torch-nocsrc: the csrc row kernels are
    CPU-only, so there it is wrpo-torch."""
    if opts.device == "cuda" and not explicit and "wrpo-torch-nocsrc" in opts.methods:
        opts.methods.remove("wrpo-torch-nocsrc")
    for m in list(opts.methods):
        if reason := unavailable(m, opts):
            opts.skipped[m] = reason
            opts.methods.remove(m)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The comparison's options on ``p`` (the defaults of :class:`HeadOptions`)."""
    d = HeadOptions(device="cpu")
    p.add_argument("--device", default=default_device())
    p.add_argument("--B", type=int, default=d.B, help="prompts")
    p.add_argument("--T", type=int, default=d.T, help="tokens per response")
    p.add_argument("--H", type=int, default=d.H)
    p.add_argument("--V", type=int, default=d.V)
    p.add_argument("--K", type=int, default=d.K, help="responses per prompt of the methods without /k2")
    p.add_argument("--num-chosen", type=int, default=None, help="chosen of those K (default K - 1)")
    p.add_argument("--gemm-rows", type=int, default=None, help="gemm-only: rows per GEMM chunk (default all)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--methods", default=None, help="comma-separated; default: all that run on the device")
    p.add_argument(
        "--compile-backend", default=d.compile_backend, help="torch.compile backend of naive-compile"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known GPUs)")
    budget_help = "seconds; methods not built by 45%% of it are skipped"
    p.add_argument("--time-budget", type=float, default=None, help=budget_help)
    p.add_argument("--no-check", action="store_true", help="skip the loss/gradient check")
    inproc_help = (
        "CPU: measure peak RSS in this process (quick, less exact) instead of a fresh one per method"
    )
    p.add_argument("--memory-inproc", action="store_true", help=inproc_help)


def options_from(ns: argparse.Namespace, p: argparse.ArgumentParser) -> HeadOptions:
    """The options parsed by :func:`add_arguments`, validated (errors through ``p``), methods selected."""
    explicit = ns.methods is not None
    methods = [m for m in ns.methods.split(",") if m] if explicit else list(METHODS)
    if unknown := set(methods) - set(METHODS) - set(EXTRA_METHODS):
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS + EXTRA_METHODS)}")
    if ns.K < 2 or not 1 <= (ns.num_chosen or ns.K - 1) < ns.K:
        p.error(f"--K {ns.K} --num-chosen {ns.num_chosen}: need K >= 2 and 1 <= num_chosen < K")
    names = [f.name for f in dataclasses.fields(HeadOptions) if f.name not in ("methods", "skipped")]
    opts = HeadOptions(**{k: getattr(ns, k) for k in names}, methods=methods)
    select_methods(opts, explicit)
    return opts


def parse(argv: list[str]) -> HeadOptions:
    """Options from command-line words alone (e.g. the sweep's ``--bench-args``)."""
    p = argparse.ArgumentParser(prog="head-loss options")
    add_arguments(p)
    return options_from(p.parse_args(argv), p)


def overrides(words: list[str]) -> dict:
    """The options that command-line ``words`` set to other than their defaults (the sweep's
    ``--bench-args``, applied over each configuration's own options)."""
    p = argparse.ArgumentParser(prog="--bench-args")
    add_arguments(p)
    given, defaults = vars(p.parse_args(words)), vars(p.parse_args([]))
    out = {k: v for k, v in given.items() if v != defaults[k]}
    if "methods" in out:
        out["methods"] = [m for m in out["methods"].split(",") if m]
    return out
