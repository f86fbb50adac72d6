"""How well a point cloud without normals gets oriented: ``estimate_normals`` on the benchmark's
inputs, scored against the true face normals. CPU only, about a second per 100k points.

For each shape and setting (the seeded points of ``benchmarks/quality.py``'s inputs; the
settings with normals, which serve as the truth): normals estimated from the points alone, as a
run does for a bare scan (:func:`neusdf.geometry.estimate_normals` over the PCA neighbourhood
that :func:`neusdf.adapt.normal_neighbours` picks from the measured noise, or ``--neighbours``),
then per row the count of normals pointing the wrong way (negative dot product with the true
normal), the mean unsigned angle to the true normal (the PCA's own error, orientation aside)
and the seconds.

The benchmark's raw rows use 100k points, like ``dense`` here; ``sparse`` (10k points) and
``noisy`` show where orientation breaks before reconstruction is tried. The held-out shapes
(``benchmarks/held_out_shapes.py``) are the ones built to break it:

    python benchmarks/orientation.py orient.json --settings dense,sparse
    python benchmarks/orientation.py ho.json --shape-file shell=ho/shell.ply --shapes shell

Prints a table and writes the JSON atomically (an existing file is kept unless --overwrite).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    DEFAULT_MESHES,
    SETTINGS,
    add_shape_arguments,
    host_info,
    make_input,
    selected_shapes,
    split_names,
)

from neusdf.adapt import normal_neighbours  # noqa: E402
from neusdf.geometry import estimate_normals, measure_points  # noqa: E402
from neusdf.mesh_io import save_json  # noqa: E402

# The settings whose inputs carry the true normals.
SCORED_SETTINGS = [name for name, s in SETTINGS.items() if s.normals]


def score_orientation(points: np.ndarray, truth: np.ndarray, neighbours: int | None) -> dict:
    """Estimates normals of (N, 3) ``points`` and scores them against (N, 3) unit ``truth``.

    ``neighbours``: the PCA neighbourhood, or None for the run's automatic choice.

    Returns:
        dict with ``points``, ``neighbours``, ``wrong`` (normals with a negative dot product
        with the truth), ``wrong_fraction``, ``mean_angle_deg`` (unsigned angle, the
        orientation aside) and ``seconds`` (the estimation's wall time).
    """
    points = points.astype(np.float64)
    k = neighbours or normal_neighbours(measure_points(points, has_normals=False))
    t0 = time.perf_counter()
    est = estimate_normals(points, k=k)
    seconds = time.perf_counter() - t0
    cos = np.einsum("ij,ij->i", est, truth.astype(np.float64))
    wrong = int((cos < 0).sum())
    angle = np.degrees(np.arccos(np.clip(np.abs(cos), 0.0, 1.0)))
    return {
        "points": len(points),
        "neighbours": k,
        "wrong": wrong,
        "wrong_fraction": wrong / len(points),
        "mean_angle_deg": float(angle.mean()),
        "seconds": seconds,
    }


def main() -> int:
    """CLI; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", help="output JSON")
    add_shape_arguments(ap)
    ap.add_argument(
        "--settings",
        default=",".join(SCORED_SETTINGS),
        help=f"comma list of {','.join(SCORED_SETTINGS)} (default: all)",
    )
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument(
        "--neighbours", type=int, default=None, help="PCA neighbourhood (default: as a run picks)"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args()
    shapes, shape_files = selected_shapes(ap, args)
    settings = split_names(ap, "--settings", args.settings, SCORED_SETTINGS)
    if args.neighbours is not None and args.neighbours < 3:
        ap.error(f"--neighbours must be >= 3, got {args.neighbours}")
    if Path(args.json).exists() and not args.overwrite:
        ap.error(f"json: {args.json} exists; pass --overwrite to replace it")

    rows = {}
    head = ("shape", "input", "points", "k", "wrong", "%", "angle", "s")
    print("{:12s} {:7s} {:>7s} {:>3s} {:>6s} {:>7s} {:>6s} {:>6s}".format(*head))
    for shape in shapes:
        for setting in settings:
            inp = make_input(args.meshes, shape, setting, shape_files)
            r = score_orientation(inp.points, inp.normals, args.neighbours)
            rows[f"{shape}/{setting}"] = r
            print(
                f"{shape:12s} {setting:7s} {r['points']:7d} {r['neighbours']:3d} {r['wrong']:6d} "
                f"{100 * r['wrong_fraction']:7.2f} {r['mean_angle_deg']:6.2f} {r['seconds']:6.2f}",
                flush=True,
            )
    save_json(args.json, {"host": host_info(), "rows": rows}, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
