"""What the first training run of a process pays once: two runs in one process, step by step.

Builds and trains one benchmark input (EVAL.md protocol, like ``benchmarks/quality.py``; the
default GPU config with the timing overrides: no logger, callbacks or validation) twice in
the same process and records, per run, the build and fit seconds and every step's wall time
(the GPU synchronised after each step, so a step's time is its own). The second run pays
none of the process's one-time costs (CUDA context, the op's loading, CUDA's lazy loading of
each kernel at its first launch), so the difference between the runs is what they cost.

``--profile cprofile`` wraps the first run's fit in cProfile, ``--profile torch`` its first
six steps in the torch profiler (CPU + CUDA; the table sorted by CPU time); both add their
own overhead to the first run's times. Run once with ``CUDA_MODULE_LOADING=EAGER`` in the
environment to see how much of the first step is lazy loading (eager loading moves it to the
context's creation, in the build).

    python benchmarks/first_steps.py out_dir                       # GPU
    python benchmarks/first_steps.py out_dir --profile cprofile
    CUDA_MODULE_LOADING=EAGER python benchmarks/first_steps.py out_dir
    python benchmarks/first_steps.py /tmp/fs --smoke --steps 12    # CPU: tests the script
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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
    SMOKE_OVERRIDES,
    TIMING_OVERRIDES,
    make_input,
    write_input,
)

from neusdf.config import compose_train_config  # noqa: E402
from neusdf.mesh_io import save_json  # noqa: E402
from neusdf.pipeline import build, fit  # noqa: E402

# steps of the first run that --profile torch records
TORCH_PROFILED_STEPS = 6


def synchronize() -> None:
    """Waits for the GPU (nothing to wait for on the CPU, in --smoke runs)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimes(L.Callback):
    """Wall clock at the training start and after each step (GPU synchronised); optionally
    runs the torch profiler over the first ``profile_steps`` steps and writes its table."""

    def __init__(self, profile_steps: int = 0, table: Path | None = None) -> None:
        self.t: list[float] = []
        self.profile_steps, self.table = profile_steps, table
        self.prof: torch.profiler.profile | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        synchronize()
        self.t.append(time.perf_counter())
        if self.profile_steps:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        synchronize()
        self.t.append(time.perf_counter())
        if self.prof is not None and trainer.global_step == self.profile_steps:
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            self.table.write_text(
                averages.table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=70)
            )
            self.prof = None


def one_run(data: Path, workdir: Path, args, first: bool) -> dict:
    """Builds and fits one run; returns its seconds and per-step milliseconds."""
    overrides = [f"data.path={data}", f"trainer.max_steps={args.steps}", *TIMING_OVERRIDES]
    overrides += SMOKE_OVERRIDES if args.smoke else []
    cfg = compose_train_config(overrides + args.override, workdir)
    t0 = time.perf_counter()
    run = build(cfg)
    t1 = time.perf_counter()
    torch_profile = first and args.profile == "torch"
    times = StepTimes(TORCH_PROFILED_STEPS if torch_profile else 0, args.out / "torch_profile.txt")
    run.trainer.callbacks.append(times)
    prof = cProfile.Profile() if first and args.profile == "cprofile" else None
    if prof is not None:
        prof.enable()
    t2 = time.perf_counter()
    fit(run)
    t3 = time.perf_counter()
    if prof is not None:
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(70)
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
        (args.out / "cprofile.txt").write_text(text.getvalue())
    t = times.t
    steps_ms = [1000 * (b - a) for a, b in zip(t, t[1:], strict=False)]
    return {
        "build_seconds": t1 - t0,
        "fit_seconds": t3 - t2,
        "fit_start_to_train_start_seconds": t[0] - t2,
        "loop_seconds": t[-1] - t[0],
        "step_ms": steps_ms,
    }


def summary(i: int, r: dict) -> str:
    """One line per run: its seconds, first steps, steps 10-59 and the slowest steps."""
    d = r["step_ms"]
    slowest = sorted(((round(x, 1), j) for j, x in enumerate(d)), reverse=True)[:6]
    return (
        f"run {i}: build {r['build_seconds']:.2f} s, fit {r['fit_seconds']:.2f} s, loop "
        f"{r['loop_seconds']:.3f} s; first 10 steps ms {[round(x, 1) for x in d[:10]]}; steps "
        f"10-59 {sum(d[10:60]):.0f} ms; median step {sorted(d)[len(d) // 2]:.2f} ms; slowest "
        f"(ms, step) {slowest}"
    )


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (first_steps.json, profiles)")
    ap.add_argument("--shape", default="bunny", choices=list(SHAPES))
    ap.add_argument("--setting", default="dense", choices=list(SETTINGS))
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--steps", type=int, default=250, help="training steps per run")
    ap.add_argument("--profile", choices=["none", "cprofile", "torch"], default="none")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU run that tests the script")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA device (or --smoke)")
    if args.steps < 10:
        ap.error(f"--steps: at least 10, got {args.steps}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="neusdf-first-") as tmp:
        data = Path(tmp) / "input.npz"
        write_input(make_input(args.meshes, args.shape, args.setting), data)
        for i in range(2):
            runs.append(one_run(data, Path(tmp) / f"run{i}", args, first=i == 0))
            print(summary(i, runs[-1]), flush=True)
    result = {
        "device": "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "input": f"{args.shape}/{args.setting}",
        "profile": args.profile,
        "overrides": args.override,
        "runs": runs,
    }
    save_json(args.out / "first_steps.json", result, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
