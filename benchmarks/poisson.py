"""Screened Poisson (Open3D) on the benchmark's inputs, on the CPU: the baseline quality.py beats.

Same rows as ``benchmarks/quality.py`` (seven shapes x dense, sparse, noisy, raw) on the same
seeded points (``quality.make_input``). Per row: screened Poisson at depth 8, then remove the
vertices whose density is below the 2% quantile; raw input (no normals) first gets Open3D's
normal estimation (``KDTreeSearchParamKNN(30)``) and
``orient_normals_consistent_tangent_plane(30)``; so does every input under ``--drop-normals``
(the baseline for runs that ignore the given normals, ``data.use_normals=false``).
Seconds cover normal estimation and orientation, Poisson and the trim. Scored with the same
metric code as quality.py (``quality.score``) against the ground truth. A reconstruction that
runs past ``--timeout`` seconds (raw orientation can take minutes) is killed and recorded as a
timeout row.

Needs the ``bench`` extra (``pip install -e ".[bench]"``; on Debian Open3D also needs the
system library libusb-1.0-0). ``benchmarks/poisson_cpu.json`` came from, on a 2-core machine:

    OMP_NUM_THREADS=2 python benchmarks/poisson.py benchmarks/poisson_cpu.json --threads 2

then the same with ``--redo --shapes bunny --settings noisy,raw`` and ``--redo --shapes fandisk
--settings raw`` (the first pass of those overlapped other work or hit the 600 s timeout; the
JSON's ``note`` says more). Open3D's threaded Poisson is not bit-reproducible: re-runs on the
same points move Hausdorff by ~0.1 x100, Chamfer and normal consistency by < 0.001.

Like quality.py, the JSON accumulates (rows in it are kept and skipped unless --redo; failed
and timed-out rows are re-run only with --redo) and is written atomically after every row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def reconstruct(
    points: np.ndarray,
    normals: np.ndarray | None,
    depth: int = 8,
    trim_quantile: float = 0.02,
    knn: int = 30,
    threads: int = -1,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Screened Poisson of a point cloud; returns vertices, triangles and timings.

    Args:
        points: (N, 3). normals: (N, 3) oriented normals, or None to estimate and orient them.
        depth: octree depth. trim_quantile: vertices with density below this quantile go.
        knn: neighbours for normal estimation and orientation. threads: Poisson's threads.
    """
    import open3d as o3d

    t0 = time.perf_counter()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    if normals is None:
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn))
        t_est = time.perf_counter()
        pcd.orient_normals_consistent_tangent_plane(knn)
    else:
        pcd.normals = o3d.utility.Vector3dVector(normals.astype(np.float64))
        t_est = time.perf_counter()
    t1 = time.perf_counter()
    mesh, density = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(
        pcd, depth=depth, n_threads=threads
    )
    density = np.asarray(density)
    mesh.remove_vertices_by_mask(density < np.quantile(density, trim_quantile))
    t2 = time.perf_counter()
    timing = {
        "seconds": t2 - t0,
        "normals_estimate_seconds": t_est - t0 if normals is None else 0.0,
        "normals_orient_seconds": t1 - t_est if normals is None else 0.0,
        "poisson_seconds": t2 - t1,
    }
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles), timing


def _child(q, points, normals, kwargs) -> None:
    """Runs :func:`reconstruct` in a child process and puts the result (or the error) on q."""
    try:
        q.put(("ok", reconstruct(points, normals, **kwargs)))
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def reconstruct_with_timeout(points, normals, timeout: float, **kwargs):
    """:func:`reconstruct` in a fresh process, killed after ``timeout`` seconds.

    Returns (vertices, triangles, timing), or None on timeout. Open3D's orientation is one
    uninterruptible C++ call, so a process is the only way to bound it.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, points, normals, kwargs))
    proc.start()
    try:
        status, value = q.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.join()
        return None
    proc.join()
    if status == "error":
        raise RuntimeError(value)
    return value


def main() -> int:
    """CLI; returns 0 when every selected row finished (timeouts count as finished)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import open3d as o3d
    from quality import (
        DEFAULT_MESHES,
        SETTINGS,
        add_shape_arguments,
        host_info,
        make_input,
        score,
        selected_shapes,
        split_names,
    )

    from neusdf.mesh_io import save_json
    from neusdf.metrics import SurfaceSet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", help="output JSON (rows already in it are kept and skipped)")
    add_shape_arguments(ap)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list (default: all)")
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--trim", type=float, default=0.02, help="density quantile trimmed")
    ap.add_argument(
        "--knn", type=int, default=30, help="neighbours for estimated normals (raw input, or all)"
    )
    ap.add_argument(
        "--drop-normals", action="store_true", help="estimate normals for every input, as for raw"
    )
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", -1)))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per reconstruction")
    ap.add_argument("--num-query", type=int, default=100_000)
    ap.add_argument("--num-ref", type=int, default=1_000_000)
    ap.add_argument("--redo", action="store_true", help="re-run selected rows already present")
    args = ap.parse_args()
    shapes, shape_files = selected_shapes(ap, args)
    settings = split_names(ap, "--settings", args.settings, SETTINGS)

    config = {k: getattr(args, k) for k in ("depth", "trim", "knn", "num_query", "num_ref")}
    if args.drop_normals:  # only then: the JSONs written before the flag stay comparable
        config["drop_normals"] = True
    data = {"config": config, "host": {}, "rows": {}}
    if Path(args.json).exists():
        with open(args.json) as f:
            data = json.load(f)
        if data.get("config") != config:
            ap.error(f"{args.json} was made with {data.get('config')}, this run is {config}")
    data["host"] = {**host_info(), "threads": args.threads, "open3d": o3d.__version__}
    kwargs = {"depth": args.depth, "trim_quantile": args.trim, "knn": args.knn}
    kwargs["threads"] = args.threads
    ok = True
    for shape in shapes:
        for setting in settings:
            key = f"{shape}/{setting}"
            if key in data["rows"] and not args.redo:
                print(f"== {key}: kept (--redo to re-run)")
                continue
            print(f"== {key}", flush=True)
            try:
                inp = make_input(args.meshes, shape, setting, shape_files)
                normals = None if args.drop_normals else inp.normals
                out = reconstruct_with_timeout(inp.points, normals, args.timeout, **kwargs)
                if out is None:
                    r = {"error": f"timeout: over {args.timeout:g} s", "timeout": True,
                         "seconds": args.timeout}  # fmt: skip
                else:
                    verts, faces, timing = out
                    t0 = time.perf_counter()
                    r = score(SurfaceSet(verts, faces), inp, args.num_query, args.num_ref)
                    r.update(timing, score_seconds=time.perf_counter() - t0)
                    r.update(vertices=len(verts), triangles=len(faces), input_seed=inp.seed)
            except Exception as e:
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"}
                ok = False
            data["rows"][key] = r
            if "error" in r:
                print(f"   {r['error']}", flush=True)
            else:
                print(
                    f"   Chamfer x100 {100 * r['chamfer_l1']:.3f}  NC "
                    f"{r['normal_consistency']:.4f}  F@0.005 {r['fscore_0.005']:.3f}  "
                    f"Hausdorff x100 {100 * r['hausdorff']:.2f}  {r['seconds']:.1f} s",
                    flush=True,
                )
            save_json(args.json, data, overwrite=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
