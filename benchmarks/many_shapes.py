"""Many shapes through a Hydra multirun: shapes per hour on 1 GPU and on N GPUs.

Runs, for each GPU count G, the one command a user types for many shapes,

    CUDA_VISIBLE_DEVICES=0..G-1 python train.py -m hydra/launcher=local data.path=a,b,...

(the joblib launcher runs two jobs at once per GPU by default, job k on GPU k mod G, each with
an equal share of the host's cores), with the default config otherwise, and records the wall
time from the command to its end, the rate from the first job's start to the last job's end
(the start-up paid once) and the rate with every job process busy (``busy_shapes_per_hour``:
without the ramp and the last round's idle slots either, what many more shapes approach).
Inputs are the benchmark inputs of ``benchmarks/quality.py`` (its points). A job is mostly host
work (start-up, data, extraction, scoring) around a short GPU phase, so several jobs share a
GPU: ``--jobs-per-gpu`` sets how many (the launcher's default, 2, otherwise), and ``--threads``
each job's OpenMP threads (otherwise joblib's default for its workers, cores / jobs).

    python benchmarks/many_shapes.py results.json --gpus 1,2 --python /tmp/lean/bin/python
    python benchmarks/many_shapes.py results.json --gpus 1,2 --jobs-per-gpu 1 --threads 16
    python benchmarks/many_shapes.py /tmp/smoke.json --smoke --inputs horse/sparse,bunny/sparse
"""

from __future__ import annotations

import argparse
import json
import os
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
    SETTINGS,
    SHAPES,
    SMOKE_OVERRIDES,
    build_op,
    make_input,
    parse_inputs,
    write_input,
)

from neusdf.mesh_io import save_json  # noqa: E402

# All 28 inputs: a count the launcher's slots divide (2 jobs per GPU: 2 and 4 slots). With 14
# inputs on 4 slots the last of four rounds runs two jobs and leaves two slots idle, which
# alone caps two GPUs at 1.75x one (7 rounds against 4).
DEFAULT_INPUTS = ",".join(f"{s}/{t}" for t in SETTINGS for s in SHAPES)


MEMORY_KEYS = ("host_resident_mib_at_start", "host_resident_mib_at_end")


def worker_growth_mib(per_job: list[dict]) -> float | None:
    """The most any process's resident memory grew from the end of its first job to the end
    of a later one (MiB; what loky's leak guard compares), or None without the figures.

    per_job: the jobs in start order, with ``process_id`` and ``host_resident_mib_at_end``.
    """
    first_end: dict[int, float] = {}
    most = None
    for j in per_job:
        pid, end = j["process_id"], j["host_resident_mib_at_end"]
        if pid is None or end is None:
            continue
        if pid not in first_end:
            first_end[pid] = end
        else:
            most = max(most or 0.0, end - first_end[pid])
    return most


def busy_shapes_per_hour(per_job: list[dict]) -> float | None:
    """Shapes per hour with every job process kept busy: the sum over the processes that ran
    two or more jobs of their jobs over the time from their first job's start to their last
    job's end (None if no process ran two).

    It leaves out what a sweep's length decides, the ramp before the slots fill and the idle
    slots of its last round, and keeps each process's first-job start-up and the gaps between
    its jobs, so a sweep of many more shapes gets about this rate or more.
    per_job: the jobs, with ``process_id``, ``started_seconds`` and ``finished_seconds``.
    """
    spans: dict[int, list[tuple[float, float]]] = {}
    for j in per_job:
        if j["process_id"] is not None:
            spans.setdefault(j["process_id"], []).append(
                (j["started_seconds"], j["finished_seconds"])
            )
    rates = [
        len(s) / (max(b for _, b in s) - min(a for a, _ in s)) for s in spans.values() if len(s) > 1
    ]
    return 3600 * sum(rates) if rates else None


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="output JSON")
    ap.add_argument("--inputs", default=DEFAULT_INPUTS, help="comma list of shape/setting")
    ap.add_argument("--gpus", default="1,2", help="comma list of GPU counts")
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    ap.add_argument(
        "--jobs-per-gpu",
        type=int,
        default=None,
        help="jobs side by side per GPU (hydra.launcher.n_jobs = GPUs x this; default: the "
        "launcher's, 2)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of each job (default: the environment's)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny CPU jobs (G side by side) to test the script"
    )
    args = ap.parse_args()
    inputs = parse_inputs(ap, "--inputs", args.inputs)
    gpus = [int(g) for g in args.gpus.split(",") if g]
    most = 8 if args.smoke else torch.cuda.device_count()
    if not gpus or min(gpus) < 1 or max(gpus) > most:
        ap.error(f"--gpus: counts from 1 to {most} (the CUDA devices)")
    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        ap.error("--jobs-per-gpu: at least 1")
    # the local launcher's default (configs/hydra/launcher/local.yaml); smoke: one per "GPU"
    per_gpu = args.jobs_per_gpu or (1 if args.smoke else 2)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads: at least 1")
    if not args.smoke:
        build_op(args.python)
    rows = []
    with tempfile.TemporaryDirectory(prefix="neusdf-many-") as tmp:
        paths = []
        for shape, setting in inputs:
            paths.append(Path(tmp) / f"{shape}_{setting}.npz")
            write_input(make_input(args.meshes, shape, setting), paths[-1])
        for g in gpus:
            out = Path(tmp) / f"multirun_{g}"
            cmd = [
                args.python,
                str(ROOT / "train.py"),
                "-m",
                "hydra/launcher=local",
                f"hydra.sweep.dir={out}",
                "data.path=" + ",".join(str(p) for p in paths),
            ]
            # explicit, also where it is the launcher's default (the smoke run has no GPU)
            cmd.append(f"hydra.launcher.n_jobs={g * per_gpu}")
            if args.smoke:
                cmd += SMOKE_OVERRIDES
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(g)))}
            if args.threads is not None:
                env["OMP_NUM_THREADS"] = str(args.threads)
            t0, epoch0 = time.perf_counter(), time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"multirun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            done = sorted(out.glob("*/metrics.json"))
            if len(done) != len(paths):
                raise RuntimeError(f"{len(done)} of {len(paths)} jobs wrote metrics.json")
            # where a job's time went, summed over the jobs (their own clocks)
            records = [json.loads(p.read_text()) for p in done]
            jobs = [r["timing"] for r in records]
            parts = {k: sum(t[k] for t in jobs) for k in RUN_TIMING_KEYS}
            # how well the jobs filled the launcher's n_jobs slots: the jobs' own wall time (from
            # entering train() to writing metrics.json) over the slots from the first start to
            # the last end
            spans = [(t["started_at"], t["finished_at"]) for t in jobs]
            first, last = min(a for a, _ in spans), max(b for _, b in spans)
            occupancy = sum(b - a for a, b in spans) / (g * per_gpu * (last - first))
            # the start-up before the jobs, from each process's first job (the processes that
            # ran jobs): from the process's start (the operating system's clock) to Hydra
            # calling the job's function, and the pipeline's import
            firsts: dict[int, dict] = {}
            for t in sorted(jobs, key=lambda t: t["started_at"]):
                if t.get("process_started_at") is not None:
                    firsts.setdefault(t["process_id"], t)
            order = sorted(firsts.values(), key=lambda t: t["process_started_at"])
            processes = [t["process_started_at"] for t in order]
            to_function = [t["job_function_at"] - t["process_started_at"] for t in order]
            imported = [t["pipeline_import_seconds"] for t in order]
            # each job: which process ran it, when, and that process's resident memory before
            # and after it (a pool that restarts a worker whose memory grew, as loky does where
            # psutil is installed, shows as more processes than slots)
            per_job = sorted(
                (
                    {
                        "input": Path(r["input"]["path"]).stem,
                        "process_id": r["timing"].get("process_id"),
                        "started_seconds": r["timing"]["started_at"] - epoch0,
                        "finished_seconds": r["timing"]["finished_at"] - epoch0,
                        **{k: r.get("memory", {}).get(k) for k in MEMORY_KEYS},
                    }
                    for r in records
                ),
                key=lambda j: j["started_seconds"],
            )
            growth = worker_growth_mib(per_job)
            busy = busy_shapes_per_hour(per_job)
            rows.append(
                {
                    "gpus": g,
                    "jobs_side_by_side": g * per_gpu,
                    "omp_threads": args.threads,
                    "shapes": len(paths),
                    "wall_seconds": wall,
                    "shapes_per_hour": 3600 * len(paths) / wall,
                    "job_seconds_summed": parts,
                    "job_wall_seconds_summed": sum(b - a for a, b in spans),
                    "first_job_start_seconds": first - epoch0,
                    # per process that ran jobs: its start after the command's, then the seconds
                    # to its first job's function and of that job's pipeline import
                    "processes_started_seconds": [x - epoch0 for x in processes],
                    "process_to_job_function_seconds": to_function,
                    "pipeline_import_seconds": imported,
                    # the rate once the launcher runs: a user with many more shapes pays the
                    # start-up (Python, imports, workers) once and then gets this rate
                    "steady_shapes_per_hour": 3600 * len(paths) / (last - first),
                    "slot_occupancy": occupancy,
                    "busy_shapes_per_hour": busy,
                    "processes_beyond_slots": max(0, len(firsts) - g * per_gpu),
                    "worker_growth_mib": growth,
                    "jobs": per_job,
                }
            )
            summed = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in parts.items())
            print(
                f"{g} GPU(s), {g * per_gpu} jobs side by side: {len(paths)} shapes in "
                f"{wall:.1f} s (first job started after {first - epoch0:.1f} s; jobs filled "
                f"{100 * occupancy:.0f}% of the launcher's slots; "
                f"jobs summed: {summed})",
                flush=True,
            )
            if processes:
                print(
                    f"  start-up: {len(processes)} job process(es) started "
                    f"{processes[0] - epoch0:.1f}-{processes[-1] - epoch0:.1f} s after the "
                    f"command, reached their first job's function "
                    f"{min(to_function):.1f}-{max(to_function):.1f} s later and imported the "
                    f"pipeline in {min(imported):.1f}-{max(imported):.1f} s",
                    flush=True,
                )
            if growth is not None:
                print(
                    f"  memory: {len(firsts)} process(es) for {g * per_gpu} slots; a process's "
                    f"resident memory grew by at most {growth:.0f} MiB after its first job",
                    flush=True,
                )
    base, steady = rows[0]["shapes_per_hour"], rows[0]["steady_shapes_per_hour"]
    busy_base = rows[0]["busy_shapes_per_hour"]
    for r in rows:
        r["speedup_vs_first"] = r["shapes_per_hour"] / base
        r["steady_speedup_vs_first"] = r["steady_shapes_per_hour"] / steady
        both = busy_base is not None and r["busy_shapes_per_hour"] is not None
        r["busy_speedup_vs_first"] = r["busy_shapes_per_hour"] / busy_base if both else None
        print(
            f"{r['gpus']} GPU(s): {r['speedup_vs_first']:.2f}x the shapes per hour of the first "
            f"row over the whole command, {r['steady_speedup_vs_first']:.2f}x from the first "
            "job's start to the last job's end"
            + (f", {r['busy_speedup_vs_first']:.2f}x with every job process busy" if both else ""),
            flush=True,
        )
    result = {
        "device": "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "python": args.python,
        "inputs": [f"{shape}/{setting}" for shape, setting in inputs],
        "rows": rows,
    }
    save_json(args.json, result, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
