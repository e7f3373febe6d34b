"""Lazy loader of the native CPU row kernels in ``csrc/`` (``torch.ops.wrpo_kernels.*``).

Nothing is compiled at import. The first CPU call that can use the kernels builds the sources of
``csrc/`` with ``torch.utils.cpp_extension.load`` (Linux; ninja, g++/``$CXX``) into torch's extension
cache, in a folder named after what goes into the binary (:func:`build_directory`, :func:`build_name`)::

    $TORCH_EXTENSIONS_DIR/py<python>_torch<torch>/wrpo_kernels_rows_<isa>_<key>/

``$TORCH_EXTENSIONS_DIR`` defaults to ``~/.cache/torch_extensions``; ``<key>`` is a hash of the bytes of
``csrc/*.cpp`` and ``csrc/*.h`` (:func:`source_files`), the compiler flags and the compiler's resolved
path (:func:`build_key`). So checkouts and environments with the same sources, torch and compiler share
one build wherever they live, and a checkout with other sources gets a folder of its own: switching
between two checkouts never rebuilds. The folder holds a copy of the sources compiled (``src/``: what
was hashed is what is built, and the ninja file does not depend on the checkout's path), the objects,
the library and, once the library has loaded, ``built.json``. A later process that finds
``built.json`` loads the library directly (no ninja, no compiler run, silent); otherwise it builds,
and says so on stderr, at WARNING on this module's logger (shown without any logging set up): a line
when it starts and one with the time taken. cpp_extension's file lock lets one of several processes
(DDP ranks) compile while the others wait (each says it is building); a lock left by a killed build is
removed once it is older than ``STALE_LOCK_S``.

Old folders are not removed: another checkout or environment may still use them. Each is about 1 MB
(one per source version, ISA, compiler, torch and Python); delete
``$TORCH_EXTENSIONS_DIR/py*_torch*/wrpo_kernels_rows_*`` at will, the next call rebuilds what it
needs. (Folders without a ``_<key>`` suffix are from before the key and are no longer used.)

Flags: ``-O3 -fopenmp`` (``at::parallel_for`` follows ``torch.set_num_threads``) plus the vector ISA
that ATen itself dispatches to here (``torch.backends.cpu.get_cpu_capability()``): AVX512 ->
``-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma``, AVX2 -> ``-mavx2 -mfma -mf16c``, anything else
-> the compiler's baseline. Not ``-march=native``: the build is named after the capability, so machines
sharing a home directory never load code for an ISA they lack.

If ``WRPO_KERNELS_NO_EXT=1``, no compiler is found or the build fails, :func:`row_kernels_enabled`
is False, the pure-torch row ops run, and a warning says why, once per process.

Once loaded, the operators also get fake (meta) kernels (:func:`register_fake_kernels`): shapes and
dtypes without data, so that ``torch.compile``, ``make_fx`` and FakeTensor tracing can pass over them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from .objective import math_dtype

ENV_DISABLE = "WRPO_KERNELS_NO_EXT"
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build (a build takes ~1 min)
SOURCES = ("ops.cpp", "lse_target.cpp", "logit_grad.cpp", "workspace.cpp")  # in csrc/, with csrc/*.h
OPS = ("lse_target", "logit_grad_", "workspace")
LDFLAGS = ("-fopenmp",)
BUILT = "built.json"  # written into the build folder once its library has loaded: a later process reuses it
# Bump when the way the library is built changes in a way that build_key does not see.
RECIPE = "wrpo_kernels rows 1"
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process
_warned = False
_switched_off = contextvars.ContextVar("wrpo_kernels_native_off", default=False)


def source_dir() -> Path:
    """``csrc/`` of a source checkout (next to the package) or of an installed wheel (inside it)."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if all((d / f).is_file() for f in SOURCES):
            return d
    raise FileNotFoundError(f"the C++ sources (csrc/*.cpp) are neither in {here} nor next to it")


def build_flags(capability: str) -> list[str]:
    """Compiler flags for ATen's CPU ``capability`` ("AVX2", "AVX512", "DEFAULT", ...)."""
    # CPU_CAPABILITY names the inline namespace of at::vec: ours must not clash with libtorch's.
    return ["-O3", "-fopenmp", *ISA_FLAGS.get(capability, []), f"-DCPU_CAPABILITY=wrpo_{capability.lower()}"]


def source_files(directory: str | os.PathLike | None = None) -> dict[str, bytes]:
    """File name -> bytes of what is compiled: ``SOURCES`` and every header, of ``directory`` (default
    :func:`source_dir`)."""
    d = source_dir() if directory is None else Path(directory)
    names = [*SOURCES, *sorted(p.name for p in d.glob("*.h"))]
    return {n: (d / n).read_bytes() for n in names}


def compiler() -> str:
    """The resolved path of the C++ compiler cpp_extension runs (``$CXX``, default ``c++``)."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH")
    return os.path.realpath(path)  # c++ -> /etc/alternatives/c++ -> g++-12: another target, another key


def build_key(files: dict[str, bytes], flags: list[str], compiler_path: str) -> str:
    """16 hex digits of a hash of the sources (names and bytes), the flags and the compiler.

    Not the sources' directory: identical checkouts in different places share a build. Python and
    torch versions are in the folder above (:func:`build_directory`).
    """
    h = hashlib.sha256()
    for part in (RECIPE, *(x for n in sorted(files) for x in (n, files[n])), *flags, compiler_path):
        b = part if isinstance(part, bytes) else part.encode()
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: no two lists hash alike
    return h.hexdigest()[:16]


def build_name(capability: str, files: dict[str, bytes], compiler_path: str) -> str:
    """``wrpo_kernels_rows_<capability>_<key>``: the build folder's and the library's name."""
    key = build_key(files, [*build_flags(capability), "|", *LDFLAGS], compiler_path)
    return f"wrpo_kernels_rows_{capability.lower()}_{key}"


def build_directory(name: str) -> Path:
    """The build folder (created): ``$TORCH_EXTENSIONS_DIR``/py<ver>_torch<ver>/``name``."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as cpp_extension does
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    directory = Path(root) / tag / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def clear_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock older than ``max_age_s``; True if one was removed.

    cpp_extension's builder holds ``<build dir>/lock`` while it compiles and releases it even on an
    exception, but a killed build (SIGKILL, OOM, a lost node) leaves it behind, and every later
    process would then wait for it forever. A build takes about a minute, so an old lock is stale.
    """
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    lock.unlink(missing_ok=True)
    warnings.warn(
        f"wrpo_kernels: removed {lock}, a build lock {age / 60:.0f} min old left by an interrupted build",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it holds it already (a rewrite would make ninja rebuild)."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data:
            return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a process building next to us never sees a half-written file


def _compile(name: str, directory: Path, files: dict[str, bytes], cap: str, cxx: str) -> None:
    from torch.utils import cpp_extension

    src = directory / "src"
    src.mkdir(exist_ok=True)
    for n, data in files.items():
        _write_atomically(src / n, data)
    clear_stale_lock(directory)
    log.warning(
        "wrpo_kernels: building the C++ row kernels in %s (once per source version; usually 20-60 s) ...",
        directory,
    )
    t0 = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(src / f) for f in SOURCES],
        extra_cflags=build_flags(cap),
        extra_ldflags=list(LDFLAGS),  # a copy: cpp_extension appends to it
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    seconds = time.perf_counter() - t0
    _check_ops()
    record = {
        "name": name,
        "files": sorted(files),
        "flags": build_flags(cap),
        "ldflags": list(LDFLAGS),
        "compiler": cxx,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "seconds": round(seconds, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomically(directory / BUILT, (json.dumps(record, indent=1) + "\n").encode())
    log.warning("wrpo_kernels: C++ row kernels built in %.0f s", seconds)


def _check_ops() -> None:
    missing = [op for op in OPS if not hasattr(torch.ops.wrpo_kernels, op)]
    if missing:
        raise RuntimeError(f"the built library registers no {missing}")


def _build() -> None:
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"they are built on Linux only (g++, OpenMP), not on {sys.platform}")
    cxx = compiler()
    cap = torch.backends.cpu.get_cpu_capability()
    files = source_files()
    name = build_name(cap, files, cxx)
    directory = build_directory(name)
    library = directory / f"{name}.so"
    if (directory / BUILT).is_file() and library.is_file():  # built and loaded before: load, silently
        try:
            torch.ops.load_library(str(library))
        except OSError as e:
            raise RuntimeError(f"{library} does not load ({e}); delete {directory} to rebuild it") from e
        _check_ops()
    else:
        _compile(name, directory, files, cap, cxx)


def _fake_lse_target(logits_t, labels, softcap, temperature):
    # logits_t [V, n] -> lse [n], target logit [n] in the math dtype (fp64 for fp64, else fp32)
    md = math_dtype(logits_t.dtype)
    n = logits_t.shape[1]
    return logits_t.new_empty(n, dtype=md), logits_t.new_empty(n, dtype=md)


def _fake_logit_grad_(logits_t, labels, scale, lse, softcap, temperature):
    return None  # in place on logits_t: no new tensor, same shape and dtype


def _fake_workspace(rows, cols, dtype):
    return torch.empty(rows, cols, dtype=dtype, device="cpu")


def register_fake_kernels() -> None:
    """Fake (meta) kernels of the three operators, following the schemas in ``csrc/ops.cpp``.

    Called by :func:`load` after a successful build/load; registering again replaces the previous kernels.
    """
    for op, fn in zip(OPS, (_fake_lse_target, _fake_logit_grad_, _fake_workspace), strict=True):
        torch.library.register_fake(f"wrpo_kernels::{op}", fn)


def _register_fakes_or_warn() -> None:
    try:
        register_fake_kernels()
    except Exception as e:  # eager calls do not need them: keep the kernels, say what tracing lacks
        warnings.warn(
            f"wrpo_kernels: no fake kernels for the native operators ({type(e).__name__}: {e}); "
            f"torch.compile cannot trace through them (the public functions run eagerly anyway)",
            RuntimeWarning,
            stacklevel=3,
        )


def _say_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"wrpo_kernels: native CPU row kernels unavailable ({reason}); using the pure-torch row ops",
            RuntimeWarning,
            stacklevel=3,
        )


def load() -> bool:
    """Build/load the extension once per process (thread safe); True if its operators are usable."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    _build()
                    _loaded = True
                except Exception as e:  # no compiler, ninja, headers; a failed build: fall back, loudly
                    _loaded = False
                    msg = str(e).strip()
                    _say_once(f"{type(e).__name__}: {msg[-1500:]}")
                if _loaded:
                    _register_fakes_or_warn()
    return _loaded


def row_kernels_enabled(device: torch.device) -> bool:
    """Whether the chunked torch backend should use the native row kernels for tensors on ``device``."""
    if device.type != "cpu" or _switched_off.get():
        return False
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        _say_once(f"{ENV_DISABLE}={os.environ[ENV_DISABLE]}")
        return False
    return load()


@contextlib.contextmanager
def disabled():
    """Private switch: calls made inside use the pure-torch row ops (tests, benchmark comparisons)."""
    token = _switched_off.set(True)
    try:
        yield
    finally:
        _switched_off.reset(token)
