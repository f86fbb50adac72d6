"""Wall time of the whole command a user types, from the command to the printed metrics.

For each selected benchmark input (EVAL.md protocol, the points of ``benchmarks/quality.py``)
runs ``python train.py data.path=<input>`` with the default config in a fresh process (Python
and library start-up, data loading, training with its checkpoints, logs and final validation,
the 256^3 extraction, scoring against the input and the printed table) and records the wall
time next to the run's own timing breakdown from its ``metrics.json``. The op is built once
before the first run, so the build is not counted.

    python benchmarks/command_wall.py results.json --inputs bunny/dense,fandisk/raw
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    DEFAULT_MESHES,
    ROOT,
    RUN_TIMING_KEYS,
    build_op,
    make_input,
    parse_inputs,
    write_input,
)

from neusdf.mesh_io import save_json  # noqa: E402


def run_command(data: Path, run_dir: Path, extra: list[str], python: str) -> dict:
    """Runs train.py on ``data`` with ``python``; returns its wall times and the run's timing.

    ``printed_seconds`` is the issue's measure, from the command to the printed metrics (the
    line naming metrics.json, the last the run prints); ``command_seconds`` runs to the
    process's exit (interpreter teardown included); ``startup_seconds`` to the moment
    ``train()`` began (interpreter, imports, config composition).
    """
    cmd = [python, str(ROOT / "train.py"), f"data.path={data}", f"hydra.run.dir={run_dir}"]
    printed = None
    with tempfile.TemporaryFile(mode="w+") as err:
        t0_wall, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(
            cmd + extra, stdout=subprocess.PIPE, stderr=err, text=True, cwd=run_dir.parent
        )
        for line in proc.stdout:
            if line.startswith("metrics: "):
                printed = time.perf_counter() - t0
        proc.wait()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"train.py failed ({proc.returncode}):\n{err.read()[-2000:]}")
    if printed is None:
        raise RuntimeError("train.py exited without printing its metrics line")
    timing = json.loads((run_dir / "metrics.json").read_text())["timing"]
    parts = {k: timing[k] for k in RUN_TIMING_KEYS}
    return {
        "printed_seconds": printed,
        "command_seconds": wall,
        "startup_seconds": timing["started_at"] - t0_wall,
        **parts,
        "steps": timing["steps"],
    }


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="output JSON")
    ap.add_argument("--inputs", default="bunny/dense", help="comma list of shape/setting")
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs train.py (e.g. a venv of benchmarks/lean_env.py)",
    )
    args = ap.parse_args()
    inputs = parse_inputs(ap, "--inputs", args.inputs)
    build_op(args.python)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="neusdf-command-") as tmp:
        for shape, setting in inputs:
            item = f"{shape}/{setting}"
            data = Path(tmp) / f"{shape}_{setting}.npz"
            write_input(make_input(args.meshes, shape, setting), data)
            r = run_command(data, Path(tmp) / f"run_{shape}_{setting}", args.override, args.python)
            rows[item] = r
            parts = ", ".join(f"{k.removesuffix('_seconds')} {r[k]:.1f}" for k in RUN_TIMING_KEYS)
            print(
                f"{item}: metrics printed after {r['printed_seconds']:.1f} s, exit "
                f"{r['command_seconds']:.1f} s (start-up {r['startup_seconds']:.1f}, {parts})",
                flush=True,
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"device": device, "python": args.python, "overrides": args.override, "rows": rows}
    save_json(args.json, result, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
