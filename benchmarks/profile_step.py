"""Where a training step's time goes, inside the real training loop (Lightning, default config).

For each mode (``eager``: ``cuda_graph=false``; ``graph``: the default, the step replayed as a
CUDA graph) trains one benchmark input (EVAL.md protocol, like ``benchmarks/quality.py``) and
measures, after a warm-up window:

- wall milliseconds per step over a timed window (no profiler; the GPU is synchronised at the
  window's ends only, as in training);
- over a following profiled window (torch.profiler, CPU + CUDA): GPU kernels per step and GPU
  milliseconds per step (the sum of kernel durations);
- GPU-busy fraction = GPU ms per step / wall ms per step (1.0: the GPU never waits for the host);
- the kernels that take the most GPU time per step.

    python benchmarks/profile_step.py results.json --shape bunny --setting dense
"""

from __future__ import annotations

import argparse
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
    """Times steps [timed[0], timed[1]) and profiles steps [profiled[0], profiled[1])."""

    def __init__(self, timed: tuple[int, int], profiled: tuple[int, int]) -> None:
        self.timed, self.profiled = timed, profiled
        self.t0 = 0.0
        self.wall_ms_per_step = float("nan")
        self.prof: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.timed[0]:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if step == self.profiled[0]:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # already counts the step that just ended
        if step == self.timed[1]:
            torch.cuda.synchronize()
            n = self.timed[1] - self.timed[0]
            self.wall_ms_per_step = 1000 * (time.perf_counter() - self.t0) / n
        if step == self.profiled[1] and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)

    def kernel_stats(self) -> dict:
        """Kernels per step and GPU ms per step of the profiled window."""
        n = self.profiled[1] - self.profiled[0]
        kernels = [
            e
            for e in self.prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
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
        }


def profile_mode(mode: str, data: Path, workdir: Path, args) -> dict:
    """Trains ``args.steps`` steps in ``mode``; returns the windows' numbers."""
    overrides = [f"data.path={data}", f"trainer.max_steps={args.steps}", *TIMING_OVERRIDES]
    overrides += MODES[mode] + args.override
    cfg = compose_train_config(overrides, workdir / mode)
    run = build(cfg)
    warm, timed, profiled = args.warmup, args.timed, args.profiled
    windows = StepWindows((warm, warm + timed), (warm + timed, warm + timed + profiled))
    run.trainer.callbacks.append(windows)
    fit(run)
    out = {"mode": mode, "steps": args.steps, "wall_ms_per_step": windows.wall_ms_per_step}
    out.update(windows.kernel_stats())
    out["gpu_busy"] = out["gpu_ms_per_step"] / out["wall_ms_per_step"]
    return out


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
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode '{m}', expected some of {list(MODES)}")
    args.steps = args.warmup + args.timed + args.profiled + 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="neusdf-profile-") as tmp:
        data = Path(tmp) / "input.npz"
        write_input(make_input(args.meshes, args.shape, args.setting), data)
        for mode in modes:
            r = profile_mode(mode, data, Path(tmp), args)
            rows.append(r)
            print(
                f"{mode:6s} {r['wall_ms_per_step']:7.2f} ms/step wall, "
                f"{r['gpu_ms_per_step']:6.2f} ms/step GPU ({r['gpu_busy']:.0%} busy), "
                f"{r['kernels_per_step']:.0f} kernels/step",
                flush=True,
            )
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "input": f"{args.shape}/{args.setting}",
        "overrides": args.override,
        "rows": rows,
    }
    save_json(args.json, result, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
