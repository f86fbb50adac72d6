"""Builds and loads the compiled op library, lazily and once per process.

The first call of any op compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` and ninja into
the torch extensions cache, then loads it; later runs reuse the cached build (it is rebuilt only
when a source changes). Build ahead of time, so that training runs, CI and DDP ranks never race
on the build, with::

    python -m neusdf.ops.build

Knobs (environment variables):

- ``TORCH_EXTENSIONS_DIR``: where builds are cached (default ``~/.cache/torch_extensions``).
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures to compile for, e.g. ``"9.0"`` for H100/H200
  (default: those of the visible GPUs).
- ``MAX_JOBS``: parallel compile jobs for ninja.
- ``NEUSDF_CPU_ONLY=1``: build the CPU part only, even where CUDA is available.
- ``NEUSDF_BUILD_VERBOSE=1``: print the compiler's output.
- ``NEUSDF_SEARCH_WARPS`` (1..8, read at the first CUDA search): warps per CUDA brute-force
  search block, for tuning (default: chosen from the problem size, at most 4).

The CUDA part is built when PyTorch has CUDA, ``nvcc`` is found (``CUDA_HOME``) and either a GPU
is visible or ``TORCH_CUDA_ARCH_LIST`` is set; otherwise only the CPU part is.

Processes that load the op at once take turns through a lock file in the build directory (torch
waits for it to go away). A process killed while it built or loaded the op leaves that file
behind, and torch would then wait forever without a word: after 10 s of waiting the loader
names the file on stderr, to be deleted if no other process is building.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = ["load_library", "cuda_enabled", "SOURCE_DIR"]

# csrc/ of an installed wheel (inside the package), else of the source checkout.
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_DIR = next(
    (d for d in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc") if d.is_dir()),
    _PACKAGE_DIR.parent / "csrc",
)
_CPU_SOURCES = (
    "knn_aggregate.cpp",
    "knn_aggregate_autograd.cpp",
    "knn_aggregate_cpu.cpp",
    "knn_search_cpu.cpp",
)
_CUDA_SOURCES = ("knn_aggregate_cuda.cu", "knn_search_cuda.cu")

_lock = threading.Lock()
_loaded: bool | None = None  # set once the library is loaded; records whether CUDA is in it


def cuda_enabled() -> bool:
    """Whether the build includes the CUDA kernels (see the module docstring for the rule)."""
    if os.environ.get("NEUSDF_CPU_ONLY", "0") == "1" or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _check_toolchain() -> None:
    """Raises a RuntimeError that says what to install when a build tool is missing.

    (nvcc needs no check here: without it cuda_enabled() is False and only the CPU part is
    built.)
    """
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"neusdf: no C++ compiler found (looked for '{cxx}'); the op is compiled on first "
            "use. Install one, e.g. 'apt-get install g++' (Debian/Ubuntu) or "
            "'conda install -c conda-forge cxx-compiler', or point CXX at it."
        )
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        raise RuntimeError("neusdf: ninja is required to build the op: 'pip install ninja'.")
    if not SOURCE_DIR.is_dir():
        raise RuntimeError(
            f"neusdf: op sources not found at {SOURCE_DIR}; install neusdf from a source "
            "checkout with 'pip install -e .'."
        )


def _library_name(with_cuda: bool) -> str:
    """The extension's name, which names its build directory in the torch extensions cache."""
    return "neusdf_ops_cuda" if with_cuda else "neusdf_ops_cpu"


def _wait_for_build_lock(lock: Path, notice_after: float = 10.0, poll: float = 0.5) -> None:
    """Returns once ``lock`` (torch's build lock of the op) does not exist; after
    ``notice_after`` seconds of waiting says once on stderr which file it waits for."""
    start = time.monotonic()
    told = False
    while lock.exists():
        if not told and time.monotonic() - start >= notice_after:
            print(
                f"neusdf: waiting for '{lock}' to go away: another process is building or "
                "loading the op. If none is (one killed part-way leaves this file behind), "
                "delete the file.",
                file=sys.stderr,
                flush=True,
            )
            told = True
        time.sleep(poll)


def load_library(verbose: bool | None = None) -> bool:
    """Builds (if needed) and loads the op library; registers the ``torch.ops.neusdf`` ops.

    Args:
        verbose: print the compiler's output (default: ``NEUSDF_BUILD_VERBOSE``).

    Returns:
        True if the loaded library has the CUDA kernels, False if it is CPU-only.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        from torch.utils.cpp_extension import _get_build_directory, load

        with_cuda = cuda_enabled()
        _check_toolchain()
        name = _library_name(with_cuda)
        # torch's own wait on this lock is silent and unbounded (module docstring)
        _wait_for_build_lock(Path(_get_build_directory(name, verbose=False)) / "lock")
        if verbose is None:
            verbose = os.environ.get("NEUSDF_BUILD_VERBOSE", "0") == "1"
        sources = [str(SOURCE_DIR / s) for s in _CPU_SOURCES]
        # No -std flag: torch picks the standard its headers need (C++17 or C++20).
        # -ffp-contract=off: no fused multiply-add behind our back, so the distance rounds the
        # same in every kernel (the exact searches compare them bit for bit).
        cflags = ["-O3", "-fopenmp", "-ffp-contract=off"]
        if with_cuda:
            sources += [str(SOURCE_DIR / s) for s in _CUDA_SOURCES]
        load(
            name=name,
            sources=sources,
            extra_include_paths=[str(SOURCE_DIR)],
            extra_cflags=cflags,
            # -lineinfo keeps kernels attributable in profilers at no run-time cost.
            extra_cuda_cflags=["-O3", "-lineinfo"],
            # at::parallel_for is OpenMP-based in PyTorch builds; link the runtime torch loads.
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=verbose,
        )
        _loaded = with_cuda
        return _loaded


def main() -> int:
    """Command line: build and load the library, print what it holds."""
    from torch.utils.cpp_extension import _get_build_directory

    name = _library_name(cuda_enabled())
    if (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file():
        print("neusdf: loading the op (built before; rebuilt only if its sources changed)")
    else:
        print("neusdf: building the op (the first build takes a minute or two) ...", flush=True)
    try:
        with_cuda = load_library(verbose=os.environ.get("NEUSDF_BUILD_VERBOSE", "0") == "1")
    except (RuntimeError, OSError) as err:
        print(f"neusdf: build failed: {err}", file=sys.stderr)
        return 1
    print(f"neusdf: op library ready ({'CPU + CUDA' if with_cuda else 'CPU only'}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
