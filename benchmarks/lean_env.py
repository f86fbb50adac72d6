"""A virtual environment holding only neusdf's dependencies, linked from an existing install.

Start-up time depends on what else is installed: Lightning imports torchmetrics, and
torchmetrics imports transformers and torchvision whenever they are present (about 9 s on the
GPU machine's image, which carries both). A user's ``pip install neusdf`` brings neither. To
time the command as such a user runs it, on a machine that cannot download packages, this
script makes a venv (no system site-packages) and links into it, from the running
interpreter's installed distributions, exactly the dependency closure of the ``dependencies``
in pyproject.toml (extras excluded). Nothing is copied or downloaded.

    python benchmarks/lean_env.py /tmp/lean        # then: /tmp/lean/bin/python train.py ...

The venv's interpreter does not see neusdf itself: run it from the checkout (train.py puts
the checkout first on the path) or with PYTHONPATH=<checkout>.

Bytecode: ``pip install`` compiles every module it installs to ``.pyc``, so a user's first
``import torch`` only reads them. The GPU machine's image was built with
``PYTHONDONTWRITEBYTECODE=1`` and ships torch and sympy without any ``.pyc``: there, every
interpreter start compiles them from source again. So that the venv starts as a pip-installed
one does, this script byte-compiles the linked packages once into a cache inside the venv
(``<venv>/pycache``, which a ``sitecustomize.py`` makes the venv's ``sys.pycache_prefix``; the
linked installation is not written to). ``--no-compile`` keeps the image's state, to measure it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: no TOML reader in the standard library
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path) -> list[Requirement]:
    """The ``[project] dependencies`` of ``pyproject``."""
    if tomllib is None:
        raise SystemExit("benchmarks/lean_env.py needs Python >= 3.11 (tomllib)")
    with open(pyproject, "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def closure(requirements: list[Requirement]) -> dict[str, md.Distribution]:
    """Installed distributions that ``requirements`` need, transitively (no extras).

    Raises:
        SystemExit: a required distribution is not installed.
    """
    found: dict[str, md.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = normalise(req.name)
        if name in found:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{req.name} (needed by neusdf) is not installed here") from None
        found[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return found


def link_distribution(dist: md.Distribution, site: Path) -> int:
    """Links the distribution's top-level files and folders into ``site``; returns how many.

    A folder that several distributions share without an ``__init__.py`` (a namespace
    package such as ``nvidia``) is created for real and only this distribution's entries are
    linked into it, so that the namespace's other members do not leak in.
    """
    tops: dict[str, set[str]] = {}
    for f in dist.files or []:
        parts = Path(f).parts
        if not parts or parts[0] == "..":  # scripts outside site-packages
            continue
        tops.setdefault(parts[0], set()).add(parts[1] if len(parts) > 1 else "")
    made = 0
    for top, children in tops.items():
        src = Path(dist.locate_file(top))
        dst = site / top
        if not src.exists():
            continue
        namespace = src.is_dir() and not (src / "__init__.py").exists() and "" not in children
        if namespace and not top.endswith((".dist-info", ".data", ".libs")):
            dst.mkdir(exist_ok=True)
            for child in children:
                if child and not (dst / child).exists() and (src / child).exists():
                    (dst / child).symlink_to(src / child)
                    made += 1
        elif not dst.exists():
            dst.symlink_to(src)
            made += 1
    return made


def compile_bytecode(venv: Path, purelib: Path) -> None:
    """Byte-compiles every package linked into ``purelib`` into ``<venv>/pycache``.

    The venv's ``sitecustomize.py`` sets ``sys.pycache_prefix`` to that folder, for the
    compilation below and for every later start of the venv's interpreter. Each linked top-level
    folder is compiled by its path inside the venv (compileall does not descend into symbolic
    links, and the cache is keyed by the path the interpreter imports from).
    """
    cache = (venv / "pycache").resolve()
    (purelib / "sitecustomize.py").write_text(
        "# written by neusdf's benchmarks/lean_env.py: the venv's own bytecode cache\n"
        f"import sys\n\nsys.pycache_prefix = {str(cache)!r}\n"
    )
    python = venv / "bin" / "python"
    tops = sorted(str(p) for p in purelib.iterdir() if p.is_dir() and p.name != "__pycache__")
    files = sorted(str(p) for p in purelib.iterdir() if p.suffix == ".py")
    # -q: errors only; -j 0: every core. A few installed test or template files are not valid
    # Python for this interpreter; compileall then exits 1, which does not matter here.
    subprocess.run([str(python), "-m", "compileall", "-q", "-j", "0", *tops, *files], check=False)


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("venv", help="folder of the new venv (must not exist)")
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="do not byte-compile the linked packages (keep the installation's own state)",
    )
    args = ap.parse_args()
    venv = Path(args.venv)
    if venv.exists():
        ap.error(f"{venv} exists: pass a new folder")
    dists = closure(project_requirements(ROOT / "pyproject.toml"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    linked = sum(link_distribution(d, purelib) for d in dists.values())
    names = ", ".join(sorted(dists))
    print(f"{venv}: {len(dists)} distributions ({linked} links): {names}")
    if not args.no_compile:
        t0 = time.perf_counter()
        compile_bytecode(venv, purelib)
        print(f"{venv}: byte-compiled into {venv / 'pycache'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
