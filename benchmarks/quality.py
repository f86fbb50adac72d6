"""Reconstruction quality and speed on the EVAL.md protocol, next to screened Poisson.

For each shape (bunny, fandisk, rocker-arm) and input setting (dense, sparse, noisy): normalise
the ground truth (bbox centred at the origin, longest side 1), sample N points area-weighted
with face normals (+ Gaussian noise for noisy), train ``train.py``'s default GPU config on that
oriented point cloud, extract the mesh at resolution 256, and score it against the ground
truth with 100k query / 1M reference samples. Prints a markdown table and writes JSON (updated
after every run, so a crash or timeout keeps the finished rows).

    python benchmarks/quality.py results.json                    # the whole table (GPU)
    python benchmarks/quality.py out.json --shapes bunny --settings noisy --steps 2000
    python benchmarks/quality.py out.json --markdown benchmarks/RESULTS.md --overwrite
    python benchmarks/quality.py /tmp/smoke.json --smoke         # tiny CPU check of the script

Seconds are the wall time of training plus extraction (data loading, neural point
initialisation, the step loop and the 256^3 extraction; not the one-time op build, which a
warm-up run absorbs, and not the metrics).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neusdf.config import compose_train_config  # noqa: E402
from neusdf.data import Normalization, sample_triangles  # noqa: E402
from neusdf.mesh_io import atomic_write, check_writable, load_shape  # noqa: E402
from neusdf.metrics import SurfaceSet, compute_metrics, save_json  # noqa: E402

SHAPES = {"bunny": "stanford-bunny.obj", "fandisk": "fandisk.obj", "rocker-arm": "rocker-arm.obj"}
SETTINGS = {"dense": (100_000, 0.0), "sparse": (10_000, 0.0), "noisy": (100_000, 0.005)}
# Config per input setting: noisy input trains with configs/experiment/noisy.yaml (as a user
# with a noisy scan would); dense and sparse with the defaults.
SETTING_OVERRIDES = {"noisy": ["experiment=noisy"]}
# Screened Poisson (Open3D 0.20, depth 8) from EVAL.md: Chamfer-L1 x100, NC, F@0.005, seconds.
POISSON = {
    ("bunny", "dense"): (0.081, 0.9956, 0.997, 2.8),
    ("bunny", "sparse"): (0.135, 0.9868, 0.976, 0.8),
    ("bunny", "noisy"): (0.145, 0.9325, 0.995, 3.4),
    ("fandisk", "dense"): (0.082, 0.9922, 0.994, 2.2),
    ("fandisk", "sparse"): (0.143, 0.9762, 0.958, 1.0),
    ("fandisk", "noisy"): (0.147, 0.9261, 0.993, 4.2),
    ("rocker-arm", "dense"): (0.064, 0.9955, 0.994, 2.7),
    ("rocker-arm", "sparse"): (0.087, 0.9896, 0.990, 1.0),
    ("rocker-arm", "noisy"): (0.125, 0.9418, 0.994, 2.4),
}


def targets_met(setting: str, chamfer100: float, nc: float, poisson: tuple) -> bool:
    """The issue's bar: Chamfer <= 1.25x Poisson (dense) or <= Poisson (sparse, noisy), and
    normal consistency above Poisson's on noisy input."""
    ok = chamfer100 <= (1.25 if setting == "dense" else 1.0) * poisson[0]
    return ok and (setting != "noisy" or nc > poisson[1])


def make_input(gt_unit: SurfaceSet, n: int, noise: float, seed: int) -> tuple:
    """EVAL.md input: n area-weighted samples with face normals, plus N(0, noise) positions."""
    rng = np.random.default_rng(seed)
    pts, nrm = sample_triangles(gt_unit.points, gt_unit.faces, n, rng)
    if noise > 0:
        pts = pts + rng.normal(scale=noise, size=pts.shape)
    return pts, nrm


def run_one(args, shape: str, setting: str, workdir: Path) -> dict:
    """Trains and extracts one (shape, setting); returns metrics and timings."""
    from train import train

    gt = load_shape(Path(args.meshes) / SHAPES[shape])
    norm = Normalization.of(gt.points)
    gt_unit = SurfaceSet(norm.to_unit(gt.points), gt.faces)
    n, noise = SETTINGS[setting]
    seed = sorted(SHAPES).index(shape) * 10 + sorted(SETTINGS).index(setting)
    pts, nrm = make_input(gt_unit, n, noise, seed)
    path = workdir / f"{shape}_{setting}.npz"
    np.savez(path, points=pts.astype(np.float32), normals=nrm.astype(np.float32))
    out = workdir / f"{shape}_{setting}"
    overrides = [f"data.path={path}", *SETTING_OVERRIDES.get(setting, []), *base_overrides(args)]
    cfg = compose_train_config(overrides, out)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    recon = load_shape(out / "mesh.ply")
    t1 = time.perf_counter()
    m = compute_metrics(
        SurfaceSet(recon.points, recon.faces), gt_unit,
        num_query=args.num_query, num_ref=args.num_ref, seed=seed,
    )  # fmt: skip
    m["metrics_seconds"] = time.perf_counter() - t1
    m["seconds"] = seconds
    m["timing"] = result["timing"]
    return m


def base_overrides(args) -> list[str]:
    """Hydra overrides shared by every run (GPU defaults unless --smoke)."""
    o = [
        f"trainer.accelerator={args.accelerator}",
        f"model.backend={args.backend}",
        # timing runs: no logging, checkpoints, validation or progress bar
        "~logger",
        "~callbacks",
        "+trainer.enable_checkpointing=false",
        "+trainer.limit_val_batches=0",
        "+trainer.enable_progress_bar=false",
        "extract.score=false",
        f"extract.resolution={args.resolution}",
    ]
    if args.steps:
        o.append(f"trainer.max_steps={args.steps}")
    if args.overwrite:
        o.append("overwrite=true")
    if args.smoke:
        o += ["model.num_points=1024", "data.num_surface=1024", "data.num_near=768",
              "data.num_space=256"]  # fmt: skip
    return o + list(args.override)


def fmt_row(shape: str, setting: str, r: dict) -> str:
    """One markdown row: ours next to Poisson's."""
    p = POISSON[(shape, setting)]
    if "error" in r:
        return f"| {shape} | {setting} | FAILED: {r['error'][:80]} |" + " |" * 10
    c100 = 100 * r["chamfer_l1"]
    t = r["timing"]
    ok = "yes" if targets_met(setting, c100, r["normal_consistency"], p) else "no"
    return (
        f"| {shape} | {setting} | {c100:.3f} | {p[0]:.3f} | {r['normal_consistency']:.4f} | "
        f"{p[1]:.4f} | {r['fscore_0.005']:.3f} | {p[2]:.3f} | {r['fscore_0.01']:.3f} | "
        f"{r['hausdorff']:.4f} | {r['seconds']:.1f} | {t['steps_per_second']:.0f} | "
        f"{t['extract_seconds']:.1f} | {ok} |"
    )


HEADER = (
    "| shape | input | Chamfer-L1 x100 | Poisson | NC | Poisson | F@0.005 | Poisson | F@0.01 | "
    "Hausdorff | s train+extract | steps/s | s extract | targets |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def warm_up(args, workdir: Path) -> None:
    """Builds/loads the op and initialises CUDA outside the timed runs."""
    from train import train

    d = np.random.default_rng(0).normal(size=(4000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    np.savez(workdir / "warmup.npz", points=d, normals=d)
    overrides = [f"data.path={workdir / 'warmup.npz'}", *base_overrides(args),
                 "trainer.max_steps=20", "extract.resolution=32",
                 "model.num_points=1024"]  # fmt: skip
    train(compose_train_config(overrides, workdir / "warmup"))


def main() -> int:
    """CLI; returns the exit status (0 when every run finished, 1 otherwise)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", help="output JSON path")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma list of dense,sparse,noisy"
    )
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: config)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--meshes", default=str(ROOT.parent / "shared" / "data" / "meshes"))
    ap.add_argument("--backend", default="compiled", choices=["compiled", "reference"])
    ap.add_argument("--accelerator", default=None, help="gpu or cpu (default: gpu if available)")
    ap.add_argument("--num-query", type=int, default=100_000)
    ap.add_argument("--num-ref", type=int, default=1_000_000)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--workdir", default=None, help="keep inputs and meshes here (default: tmp)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run to test the script")
    args = ap.parse_args()

    import torch

    shapes, settings = args.shapes.split(","), args.settings.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape '{s}', expected some of {list(SHAPES)}")
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"--settings: unknown setting '{s}', expected some of {list(SETTINGS)}")
    if args.accelerator is None:
        args.accelerator = "gpu" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.steps = args.steps or 30
        args.resolution = min(args.resolution, 64)
        args.num_query, args.num_ref = min(args.num_query, 20_000), min(args.num_ref, 100_000)
    for p in filter(None, (args.json, args.markdown)):
        try:
            check_writable(p, args.overwrite)
        except FileExistsError as e:
            ap.error(str(e))
    torch.set_float32_matmul_precision("high")

    results: dict = {"config": vars(args).copy(), "runs": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="neusdf-quality-") as tmp:
        # --workdir keeps the inputs and meshes for inspection; by default they are temporary
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        warm_up(args, workdir)
        results["warmup_seconds"] = time.perf_counter() - t0
        for shape in shapes:
            for setting in settings:
                key = f"{shape}/{setting}"
                print(f"== {key}", flush=True)
                try:
                    r = run_one(args, shape, setting, workdir)
                except Exception as e:  # keep the rest of the table; the JSON has the trace
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
                results["runs"][key] = r
                rows.append(fmt_row(shape, setting, r))
                print(HEADER.splitlines()[0] + "\n" + rows[-1], flush=True)
                save_json(args.json, results, overwrite=True)
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    table = f"Device: {device}; steps: {args.steps or 'config default'}; " \
            f"resolution {args.resolution}\n\n{HEADER}\n" + "\n".join(rows)  # fmt: skip
    print(table)
    if args.markdown:
        atomic_write(args.markdown, (table + "\n").encode(), overwrite=True)
    ok = all("error" not in r for r in results["runs"].values())
    fin = [r for r in results["runs"].values() if "error" not in r]
    if fin:
        print(f"mean seconds per shape: {np.mean([r['seconds'] for r in fin]):.1f}; "
              f"all finished: {ok}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
