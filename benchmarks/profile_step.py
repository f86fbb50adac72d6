"""Where a training step's time goes, inside the real training loop (Lightning, default config).

For each mode (``eager``: ``cuda_graph=false``; ``graph``: the default, the step replayed as a
CUDA graph) trains one benchmark input (EVAL.md protocol, like ``benchmarks/quality.py``) and
measures, after a warm-up window:

- wall milliseconds per step over a timed window (no profiler; the GPU is synchronised at the
  window's ends only, as in training);
- over a following profiled window (torch.profiler, CPU + CUDA): GPU kernels per step and GPU
  milliseconds per step (the sum of kernel durations);
- GPU-busy fraction = GPU ms per step / wall ms per step (1.0: the GPU never waits for the host);
- the host's milliseconds between the starts of consecutive steps (median over the timed
  window): below the wall time per step when the host queues steps ahead of the GPU, equal to
  it when something makes the host wait for the GPU each step;
- the kernels that take the most GPU time per step.

``--devices N`` (N > 1) trains under DDP (``trainer=ddp``) on N GPUs: the script starts
itself on every rank with ``python -m torch.distributed.run`` (the input written once
before), each rank measures its own windows, and the JSON holds every rank's numbers
(``ranks``). ``--sync-every-step`` waits for the GPU at the end of every step, which is what a
per-step ``.item()`` on a GPU tensor costs (diagnosis: with and without, side by side).

    python benchmarks/profile_step.py results.json --shape bunny --setting dense
    python benchmarks/profile_step.py results.json --modes graph --devices 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    DEFAULT_MESHES,
    SETTINGS,
    SHAPES,
    TIMING_OVERRIDES,
    make_input,
    write_input,
)

from neusdf.config import compose_train_config  # noqa: E402
from neusdf.mesh_io import save_json  # noqa: E402
from neusdf.pipeline import build, fit  # noqa: E402

# Kernels listed by GPU time per step in the JSON.
TOP_KERNELS = 15
MODES = {"eager": ["cuda_graph=false"], "graph": ["cuda_graph=true"]}


class StepWindows(L.Callback):
    """Times steps [timed[0], timed[1]) and profiles steps [profiled[0], profiled[1]);
    ``sync_every_step``: waits for the GPU at the end of every step."""

    def __init__(
        self, timed: tuple[int, int], profiled: tuple[int, int], sync_every_step: bool = False
    ) -> None:
        self.timed, self.profiled = timed, profiled
        self.sync_every_step = sync_every_step
        self.t0 = 0.0
        self.wall_ms_per_step = float("nan")
        self.step_starts: list[float] = []
        self.prof: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.timed[0]:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if self.timed[0] <= step < self.timed[1]:
            self.step_starts.append(time.perf_counter())
        if step == self.profiled[0]:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.sync_every_step:
            torch.cuda.synchronize()
        step = trainer.global_step  # already counts the step that just ended
        if step == self.timed[1]:
            torch.cuda.synchronize()
            n = self.timed[1] - self.timed[0]
            self.wall_ms_per_step = 1000 * (time.perf_counter() - self.t0) / n
        if step == self.profiled[1] and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)

    def host_ms_between_step_starts(self) -> float:
        """Median host milliseconds from one step's start to the next's (timed window)."""
        gaps = [b - a for a, b in itertools.pairwise(self.step_starts)]
        return 1000 * statistics.median(gaps) if gaps else float("nan")

    def kernel_stats(self) -> dict:
        """Kernels per step and GPU ms per step of the profiled window."""
        n = self.profiled[1] - self.profiled[0]
        events = self.prof.events()
        # GPU-side ranges of user annotations (DistributedDataParallel.forward, nccl:...) are
        # CUDA events too; they span kernels already counted
        kernels = [
            e
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith(("Memcpy", "Memset"))
        ]
        gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
        return {
            "kernels_per_step": len(kernels) / n,
            "gpu_ms_per_step": gpu_us / 1000 / n,
            "top_kernels_ms_per_step": {k[:120]: v / 1000 / n for k, v in top},
            "host_waits_per_step": host_waits(events, n),
            "top_host_ops_self_ms_per_step": top_host_ops(events, n),
        }


def host_waits(events, steps: int) -> dict[str, dict[str, float]]:
    """The CUDA runtime calls in which the host waits for the GPU (``cuda*Synchronize``), by
    the chain of operations that made them (innermost last): calls and milliseconds per step."""
    waits: dict[str, dict[str, float]] = {}
    for e in events:
        if not (e.name.startswith("cuda") and e.name.endswith("Synchronize")):
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) < 5:
            chain.append(parent.name)
            parent = parent.cpu_parent
        w = waits.setdefault(" < ".join(chain), {"calls_per_step": 0.0, "ms_per_step": 0.0})
        w["calls_per_step"] += 1 / steps
        w["ms_per_step"] += e.time_range.elapsed_us() / 1000 / steps
    return waits


def top_host_ops(events, steps: int) -> dict[str, float]:
    """The host operations and CUDA runtime calls with the most self time (their own, not
    their children's), milliseconds per step."""
    by_name: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {k[:120]: v / 1000 / steps for k, v in top}


def profile_mode(mode: str, data: Path, workdir: Path, args) -> dict:
    """Trains ``args.steps`` steps in ``mode``; returns the windows' numbers (this rank's)."""
    overrides = [f"data.path={data}", f"trainer.max_steps={args.steps}", *TIMING_OVERRIDES]
    if args.devices > 1:
        overrides += ["trainer=ddp", f"trainer.devices={args.devices}"]
    overrides += MODES[mode] + args.override
    cfg = compose_train_config(overrides, workdir / mode)
    run = build(cfg)
    warm, timed, profiled = args.warmup, args.timed, args.profiled
    windows = StepWindows(
        (warm, warm + timed), (warm + timed, warm + timed + profiled), args.sync_every_step
    )
    run.trainer.callbacks.append(windows)
    fit(run)
    out = {"mode": mode, "steps": args.steps, "wall_ms_per_step": windows.wall_ms_per_step}
    out["host_ms_between_step_starts"] = windows.host_ms_between_step_starts()
    out.update(windows.kernel_stats())
    out["gpu_busy"] = out["gpu_ms_per_step"] / out["wall_ms_per_step"]
    return out


def launch_ranks(args, argv: list[str]) -> int:
    """Writes the input once, then runs this script on ``args.devices`` ranks under torchrun
    (the ranks share the input file and the run directories); returns its exit status."""
    with tempfile.TemporaryDirectory(prefix="neusdf-profile-") as tmp:
        data = Path(tmp) / "input.npz"
        write_input(make_input(args.meshes, args.shape, args.setting), data)
        cmd = [
            sys.executable,
            *("-m", "torch.distributed.run", "--standalone"),
            f"--nproc_per_node={args.devices}",
            str(Path(__file__).resolve()),
            *argv,
            *("--input-file", str(data), "--workdir", tmp),
        ]
        return subprocess.run(cmd).returncode


def print_row(r: dict, label: str) -> None:
    print(
        f"{label:14s} {r['wall_ms_per_step']:7.2f} ms/step wall, "
        f"{r['gpu_ms_per_step']:6.2f} ms/step GPU ({r['gpu_busy']:.0%} busy), "
        f"host {r['host_ms_between_step_starts']:.2f} ms between step starts "
        f"({sum(w['ms_per_step'] for w in r['host_waits_per_step'].values()):.2f} waiting), "
        f"{r['kernels_per_step']:.0f} kernels/step",
        flush=True,
    )


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="output JSON")
    ap.add_argument("--shape", default="bunny", choices=list(SHAPES))
    ap.add_argument("--setting", default="dense", choices=list(SETTINGS))
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--modes", default="eager,graph", help="comma list of eager,graph")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--warmup", type=int, default=100, help="steps before the timed window")
    ap.add_argument("--timed", type=int, default=200, help="steps in the timed window")
    ap.add_argument("--profiled", type=int, default=20, help="steps in the profiled window")
    ap.add_argument("--devices", type=int, default=1, help="GPUs; above 1: DDP under torchrun")
    ap.add_argument(
        "--sync-every-step", action="store_true", help="wait for the GPU after every step"
    )
    # set by launch_ranks for the ranks it starts
    ap.add_argument("--input-file", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.devices < 1:
        ap.error(f"--devices: expected a GPU count >= 1, got {args.devices}")
    if torch.cuda.device_count() < args.devices:
        ap.error(f"--devices {args.devices}: only {torch.cuda.device_count()} CUDA devices")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode '{m}', expected some of {list(MODES)}")
    if args.devices > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ranks(args, sys.argv[1:])
    args.steps = args.warmup + args.timed + args.profiled + 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="neusdf-profile-") as tmp:
        workdir = Path(args.workdir or tmp)
        data = Path(args.input_file) if args.input_file else workdir / "input.npz"
        if not args.input_file:
            write_input(make_input(args.meshes, args.shape, args.setting), data)
        for mode in modes:
            r = profile_mode(mode, data, workdir, args)
            if args.devices > 1:  # every rank's numbers; the slowest rank sets the pace
                ranks: list = [None] * args.devices
                torch.distributed.all_gather_object(ranks, r)
                if torch.distributed.get_rank() == 0:
                    for i, x in enumerate(ranks):
                        print_row(x, f"{mode} rank {i}")
                r = {"mode": mode, "steps": args.steps, "ranks": ranks}
            else:
                print_row(r, mode)
            rows.append(r)
    if args.devices > 1 and torch.distributed.get_rank() != 0:
        return 0
    result = {
        "device": torch.cuda.get_device_name(),
        "devices": args.devices,
        "torch": torch.__version__,
        "input": f"{args.shape}/{args.setting}",
        "overrides": args.override,
        "sync_every_step": args.sync_every_step,
        "rows": rows,
    }
    save_json(args.json, result, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
