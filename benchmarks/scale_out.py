"""One shape on several GPUs (DDP) against one GPU: samples per second and time to quality.

For one benchmark input (EVAL.md protocol, the points of ``benchmarks/quality.py``) runs
``python train.py`` in a fresh process for each configuration and step count:

- ``1 GPU``: the default (the step replayed as a CUDA graph);
- ``DDP eager``: ``trainer=ddp trainer.devices=N cuda_graph=false`` (every step launched from
  Python);
- ``DDP graph``: ``trainer=ddp trainer.devices=N`` (each rank replays its step as a graph; the
  gradients are averaged after each replay);
- ``DDP graph, 1/N steps``: the same number of samples in total as the one-GPU run;
- ``DDP graph, S steps`` for each S of ``--ddp-steps``: fewer steps still, to find the
  shortest DDP run that reaches the one-GPU run's quality;
- with ``--torchrun``, ``DDP torchrun, 1/N steps``: the 1/N-steps run with every rank started
  at once by ``python -m torch.distributed.run`` (Lightning then launches nothing; by itself
  it starts the other ranks only when training begins, by running the script again);
- with ``--torchrun-only``: the one-GPU run, then every DDP graph run (all steps, 1/N steps,
  ``--ddp-steps``) started by torchrun; no Lightning-launched or eager DDP run.

``--seeds 0,1,2`` runs every configuration once per seed (``seed=S``: the samples and the
neural points' initial subsample), seeds outermost. The Chamfer-L1 of one configuration
spreads by about 0.0002 x100 between runs, as much as the differences being measured, so time
to quality compares means over the seeds.

Time to quality: for each step count, the DDP run with the shortest training loop whose
Chamfer-L1 (mean over the seeds) is at most the one-GPU run's, its loop, fit and command
seconds (means) against the one-GPU run's (``time_to_quality`` in the JSON, each
configuration's means in ``means``; none when no DDP run reaches it).

Each rank draws its own samples, so N ranks draw N times the samples of one per step. Recorded
per run: the training loop's seconds (first step to last, all ranks started; ``loop_seconds``
in the run's metrics.json), samples per second over all ranks, the command's wall time (which
also counts Python start-up and, under DDP, the launch of the other ranks), and the mesh
scored against the ground truth (Chamfer-L1, Hausdorff, watertight).

    python benchmarks/scale_out.py results.json --input horse/dense --steps 250,2000
    python benchmarks/scale_out.py results.json --steps 2000 --no-eager   # the graph rows only
    python benchmarks/scale_out.py results.json --steps 2000 --no-eager --ddp-steps 600,800
    python benchmarks/scale_out.py results.json --steps 2000 --no-eager --torchrun
    python benchmarks/scale_out.py results.json --steps 2000 --torchrun-only --ddp-steps 800 \
        --seeds 0,1,2
    python benchmarks/scale_out.py /tmp/smoke.json --smoke --steps 4 --num-ref 20000  # CPU
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
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    DEFAULT_MESHES,
    ROOT,
    SMOKE_OVERRIDES,
    TIMING_OVERRIDES,
    build_op,
    make_input,
    parse_inputs,
    score,
    write_input,
)

from neusdf.mesh_io import save_json  # noqa: E402
from neusdf.metrics import SurfaceSet  # noqa: E402


def configurations(
    devices: int,
    steps: int,
    eager: bool,
    ddp_steps: list[int] = (),
    torchrun: bool = False,
    torchrun_only: bool = False,
) -> list[tuple[str, int, list[str], int]]:
    """(name, steps, overrides, ranks started by torchrun: 0 for none) of the runs for one step
    count (``eager``: with DDP eager; ``ddp_steps``: further DDP runs of these step counts;
    ``torchrun``: the 1/N-steps run again with all ranks started at once; ``torchrun_only``:
    every DDP graph run started by torchrun instead of Lightning, no eager run)."""
    ddp = ["trainer=ddp", f"trainer.devices={devices}"]
    short = max(steps // devices, 1)
    one = ("1 device", steps, ["trainer.devices=1"], 0)
    if torchrun_only:
        return [
            one,
            ("DDP torchrun", steps, ddp, devices),
            (f"DDP torchrun, 1/{devices} steps", short, ddp, devices),
            *((f"DDP torchrun, {n} steps", n, ddp, devices) for n in ddp_steps),
        ]
    return [
        one,
        *([("DDP eager", steps, [*ddp, "cuda_graph=false"], 0)] if eager else []),
        ("DDP graph", steps, ddp, 0),
        (f"DDP graph, 1/{devices} steps", short, ddp, 0),
        *((f"DDP graph, {n} steps", n, ddp, 0) for n in ddp_steps),
        *([(f"DDP torchrun, 1/{devices} steps", short, ddp, devices)] if torchrun else []),
    ]


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per configuration: the mean over its seeds of the seconds, the samples per
    second and the scores, with ``seeds`` (how many) and ``chamfer_l1_runs`` (each seed's)."""
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
    keys = ("loop_seconds", "fit_seconds", "command_seconds", "samples_per_second")
    keys += ("chamfer_l1", "hausdorff")
    out = []
    for config, rs in by_config.items():
        m = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
        out.append(
            {
                "config": config,
                "base_steps": rs[0]["base_steps"],
                "steps": rs[0]["steps"],
                "seeds": len(rs),
                **m,
                "chamfer_l1_runs": [r["chamfer_l1"] for r in rs],
            }
        )
    return out


def time_to_quality(means: list[dict]) -> dict | None:
    """The shortest DDP run (by training loop) of one step count whose Chamfer-L1 is at most
    the one-GPU run's, both as means over the seeds (``means``: :func:`mean_rows` of that step
    count's runs): its loop, fit and command seconds against the one-GPU run's (None: none
    reached)."""
    one = next(r for r in means if r["config"] == "1 device")
    ok = [
        r
        for r in means
        if r["config"].startswith(("DDP graph", "DDP torchrun"))
        and r["chamfer_l1"] <= one["chamfer_l1"]
    ]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["loop_seconds"])
    return {
        "base_steps": one["base_steps"],
        "config": best["config"],
        "steps": best["steps"],
        "seeds": best["seeds"],
        "loop_ratio": best["loop_seconds"] / one["loop_seconds"],
        "fit_ratio": best["fit_seconds"] / one["fit_seconds"],
        "command_ratio": best["command_seconds"] / one["command_seconds"],
        "chamfer_l1": best["chamfer_l1"],
        "one_gpu_chamfer_l1": one["chamfer_l1"],
    }


def run(
    python: str, data: Path, run_dir: Path, steps: int, overrides: list[str], torchrun: int = 0
) -> dict:
    """Runs train.py (scored here afterwards, against the ground truth, not by the run);
    returns its timing (metrics.json) and the command's wall seconds. ``torchrun``: start that
    many ranks at once with ``python -m torch.distributed.run`` (0: a plain run)."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        if torchrun
        else []
    )
    cmd = [
        python,
        *launcher,
        str(ROOT / "train.py"),
        f"data.path={data}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        *TIMING_OVERRIDES,
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    timing = json.loads((run_dir / "metrics.json").read_text())["timing"]
    return {"command_seconds": wall, **timing}


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="output JSON")
    ap.add_argument("--input", default="horse/dense", help="shape/setting")
    ap.add_argument("--steps", default="250,2000", help="comma list of step counts")
    ap.add_argument("--devices", type=int, default=2, help="GPUs for the DDP runs")
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--num-ref", type=int, default=1_000_000, help="scoring samples")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU runs to test the script")
    ap.add_argument("--no-eager", action="store_true", help="skip the DDP eager runs")
    ap.add_argument("--ddp-steps", default="", help="comma list: further DDP runs (steps)")
    ap.add_argument("--torchrun", action="store_true", help="also the 1/N run under torchrun")
    ap.add_argument(
        "--torchrun-only", action="store_true", help="every DDP run under torchrun, no eager"
    )
    ap.add_argument("--seeds", default="0", help="comma list: every run once per seed")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    args = ap.parse_args()
    inputs = parse_inputs(ap, "--input", args.input)
    if len(inputs) != 1:
        ap.error(f"--input: one shape/setting, got '{args.input}'")
    [(shape, setting)] = inputs
    steps_list = [int(s) for s in args.steps.split(",") if s]
    if not steps_list or min(steps_list) < 1:
        ap.error("--steps: expected positive step counts, e.g. 250,2000")
    try:
        ddp_steps = [int(s) for s in args.ddp_steps.split(",") if s]
    except ValueError:
        ap.error(f"--ddp-steps: expected step counts, e.g. 600,800, got '{args.ddp_steps}'")
    if ddp_steps and min(ddp_steps) < 1:
        ap.error("--ddp-steps: expected positive step counts")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds: expected integers, e.g. 0,1,2, got '{args.seeds}'")
    if not seeds or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds: expected distinct integers, got '{args.seeds}'")
    if not args.smoke and torch.cuda.device_count() < args.devices:
        ap.error(f"--devices {args.devices}: only {torch.cuda.device_count()} CUDA devices")
    extra = SMOKE_OVERRIDES if args.smoke else []
    if not args.smoke:
        build_op(args.python)
    inp = make_input(args.meshes, shape, setting)
    rows: list[dict] = []
    result = {
        "device": "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "devices": args.devices,
        "input": args.input,
        "python": args.python,
        "torch": torch.__version__,
        "seeds": seeds,
        "rows": rows,
        "means": [],
        "time_to_quality": [],
    }
    with tempfile.TemporaryDirectory(prefix="neusdf-scale-") as tmp:
        data = Path(tmp) / "input.npz"
        write_input(inp, data)
        for steps in steps_list:
            first = len(rows)
            configs = configurations(
                args.devices, steps, not args.no_eager, ddp_steps, args.torchrun, args.torchrun_only
            )
            # seeds outermost: a drift of the machine's speed touches every configuration alike
            runs = [(seed, i, c) for seed in seeds for i, c in enumerate(configs)]
            for seed, i, (name, n, overrides, ranks) in runs:
                run_dir = Path(tmp) / f"run_{steps}_{i}_{seed}"
                r = run(args.python, data, run_dir, n, [*extra, *overrides, f"seed={seed}"], ranks)
                mesh = trimesh.load(run_dir / "mesh.ply", process=False)
                m = score(SurfaceSet(mesh.vertices, mesh.faces), inp, 100_000, args.num_ref)
                row = {
                    "config": name,
                    "seed": seed,
                    "base_steps": steps,
                    "overrides": overrides,
                    **r,
                    "samples_per_second": r["steps"] * r["samples_per_step"] / r["loop_seconds"],
                    "chamfer_l1": m["chamfer_l1"],
                    "hausdorff": m["hausdorff"],
                    "fscore_0.005": m["fscore_0.005"],
                    "watertight": bool(mesh.is_watertight),
                }
                rows.append(row)
                save_json(args.json, result, overwrite=True)  # a row at a time
                print(
                    f"{steps:5d} {name:26s} seed {seed} steps {r['steps']:5d}  loop "
                    f"{r['loop_seconds']:6.2f} s  {row['samples_per_second'] / 1e6:6.2f} M "
                    f"samples/s  fit {r['fit_seconds']:5.2f} s (connect "
                    f"{r.get('connect_seconds', float('nan')):4.2f}, prepare "
                    f"{r.get('prepare_seconds', float('nan')):4.2f})  command "
                    f"{r['command_seconds']:5.1f} s  Chamfer x100 {100 * m['chamfer_l1']:.4f}  "
                    f"Hausdorff x100 {100 * m['hausdorff']:.2f}  watertight {row['watertight']}",
                    flush=True,
                )
            means = mean_rows(rows[first:])
            result["means"].extend(means)
            best = time_to_quality(means)
            result["time_to_quality"].append(best)
            save_json(args.json, result, overwrite=True)
            print(
                f"{steps:5d} one-GPU Chamfer reached by: "
                + (
                    "no DDP run"
                    if best is None
                    else f"{best['config']} in {best['loop_ratio']:.3f}x the loop time "
                    f"({best['fit_ratio']:.3f}x the fit, {best['command_ratio']:.3f}x the "
                    "command)"
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
