"""Where the native row kernels are built and what a build says.

One folder per source version, compiler flags and compiler (not per checkout path), so that two
checkouts with the same sources share a build and never rebuild each other's; a build is announced
on stderr, once, and a reuse is silent. The subprocess test compiles the kernels into a temporary
folder (~20-60 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wrpo_kernels import native

ROOT = Path(__file__).resolve().parents[3]
NO_TOOLS = shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None


def copy_checkout(dst: Path) -> Path:
    """The package and csrc/ of this checkout, copied to ``dst`` (another checkout, same sources)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "wrpo_kernels", dst / "wrpo_kernels", ignore=ignore)
    shutil.copytree(native.source_dir(), dst / "csrc", ignore=ignore)
    return dst


def test_build_name_follows_the_source_bytes_not_their_directory(tmp_path):
    a = shutil.copytree(native.source_dir(), tmp_path / "a" / "csrc")
    b = shutil.copytree(native.source_dir(), tmp_path / "b" / "csrc")

    def name(d):
        return native.build_name("AVX2", native.source_files(d), "/usr/bin/g++-12")

    assert set(native.source_files(a)) == {*native.SOURCES, "head_math.h"}
    assert name(a) == name(b) == name(native.source_dir())  # same bytes elsewhere: same build
    for f in [*native.SOURCES, "head_math.h"]:
        data = (b / f).read_bytes()
        (b / f).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit of one byte
        assert name(b) != name(a), f
        (b / f).write_bytes(data)
    assert name(b) == name(a)
    (b / "extra.h").write_text("// a header the sources may include\n")
    assert name(b) != name(a)


def test_build_name_follows_flags_and_compiler(monkeypatch):
    files = native.source_files()
    names = {
        native.build_name(cap, files, cxx)
        for cap in ("AVX2", "AVX512", "DEFAULT")
        for cxx in ("/usr/bin/x86_64-linux-gnu-g++-12", "/usr/bin/clang++-16")
    }
    assert len(names) == 6
    base = native.build_name("AVX512", files, "/usr/bin/g++")
    assert re.fullmatch(r"wrpo_kernels_rows_avx512_[0-9a-f]{16}", base), base
    flags = native.build_flags
    monkeypatch.setattr(native, "build_flags", lambda cap: [*flags(cap), "-DNDEBUG"])
    assert native.build_name("AVX512", files, "/usr/bin/g++") != base
    monkeypatch.setattr(native, "build_flags", flags)
    monkeypatch.setattr(native, "LDFLAGS", (*native.LDFLAGS, "-lm"))
    assert native.build_name("AVX512", files, "/usr/bin/g++") != base


def test_compiler_is_cxx_resolved_through_links(monkeypatch, tmp_path):
    real = shutil.which("c++") or shutil.which("g++")
    if real is None:
        pytest.skip("no C++ compiler on PATH")
    (tmp_path / "my-c++").symlink_to(real)
    monkeypatch.setenv("CXX", str(tmp_path / "my-c++"))
    assert native.compiler() == os.path.realpath(real)  # another name of the same compiler: same key
    other = tmp_path / "other-c++"
    other.write_text('#!/bin/sh\nexec c++ "$@"\n')
    other.chmod(0o755)
    monkeypatch.setenv("CXX", str(other))
    assert native.compiler() == str(other)
    monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        native.compiler()


@pytest.mark.skipif(NO_TOOLS, reason="no C++ compiler or ninja on PATH")
def test_the_kernels_load_from_the_folder_of_their_key():
    if os.environ.get(native.ENV_DISABLE, "") not in ("", "0"):
        pytest.skip(f"{native.ENV_DISABLE} is set")
    assert native.load()
    files = native.source_files()
    name = native.build_name(torch.backends.cpu.get_cpu_capability(), files, native.compiler())
    d = native.build_directory(name)
    assert (d / native.BUILT).is_file() and (d / f"{name}.so").is_file()
    assert {f: (d / "src" / f).read_bytes() for f in files} == files  # what was hashed was built


RUN = """
import sys, time
t = time.time()
import torch
from wrpo_kernels import native
if sys.argv[1] == "reuse":
    import torch.utils.cpp_extension as cpp_extension
    def load(**kw):
        raise AssertionError("a reuse must not run the builder")
    cpp_extension.load = load
assert native.load() and native.load() and native.row_kernels_enabled(torch.device("cpu")), "no kernels"
print(native.__file__)
print(f"{time.time() - t:.1f} s")
"""


def first_call(checkout: Path, mode: str, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-c", RUN, mode], cwd=checkout, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"{mode}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert res.stdout.splitlines()[0] == str(checkout / "wrpo_kernels" / "native.py"), res.stdout  # this copy
    return res


@pytest.mark.skipif(NO_TOOLS, reason="no C++ compiler or ninja on PATH")
def test_a_build_announces_itself_once_and_another_checkout_reuses_it_silently(tmp_path):
    if os.environ.get(native.ENV_DISABLE, "") not in ("", "0"):
        pytest.skip(f"{native.ENV_DISABLE} is set")
    ext = tmp_path / "torch_extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), PYTHONWARNINGS="default")
    env.pop("PYTHONPATH", None)
    built = first_call(copy_checkout(tmp_path / "a"), "build", env)
    (folder,) = ext.glob("py*_torch*/wrpo_kernels_rows_*")
    starts = [ln for ln in built.stderr.splitlines() if "wrpo_kernels: building the C++ row kernels" in ln]
    ends = [ln for ln in built.stderr.splitlines() if re.search(r"row kernels built in \d+ s", ln)]
    assert len(starts) == 1 and len(ends) == 1, built.stderr
    assert str(folder) in starts[0] and (folder / native.BUILT).is_file()

    reused = first_call(copy_checkout(tmp_path / "b"), "reuse", env)  # same sources, another path
    assert "wrpo_kernels:" not in reused.stderr and "row kernels" not in reused.stderr, reused.stderr
    assert list(ext.glob("py*_torch*/wrpo_kernels_rows_*")) == [folder]
    print(f"first call: build {built.stdout.splitlines()[1]}, reuse {reused.stdout.splitlines()[1]}")
