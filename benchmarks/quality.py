"""Reconstruction quality and speed on the EVAL.md protocol, next to screened Poisson.

Seven shapes (bunny, fandisk, rocker-arm, armadillo, elephant, fertility, horse) x four input
settings (dense: 100k oriented points; sparse: 10k; noisy: 100k with Gaussian position noise of
std 0.005; raw: 100k points without normals). For each row: normalise the ground truth (bbox
centred at the origin, longest side 1), draw the seeded input with :func:`make_input` (the same
points, bit for bit, that ``benchmarks/poisson.py`` reconstructs), train ``train.py``'s default
config on it (ONE config for every input: no per-setting preset), extract the mesh and score it
against the ground truth with 100k query / 1M reference samples.

Variants (``--variants``): ``neusdf`` is the default model; ``mlp`` adds the Hydra override
``model=mlp`` (a plain-MLP SDF baseline).

The JSON accumulates: rows already in it are kept and skipped (so the table can be split over
several calls with different ``--shapes``/``--settings``), unless ``--redo`` (re-run the selected
rows, keep the others) or ``--overwrite`` (start a fresh file). Rows that failed are re-run.
The file is written atomically after every row.

    python benchmarks/quality.py results.json --markdown results.md          # the table (GPU)
    python benchmarks/quality.py results.json --shapes bunny,fandisk --settings raw
    python benchmarks/quality.py results.json --variants neusdf,mlp --tuned-on bunny,fandisk
    python benchmarks/quality.py /tmp/smoke.json --smoke --shapes bunny --settings dense
    python benchmarks/quality.py held_out.json --shape-file plate=plate.obj --shapes plate

Timings per row: steps and ms per step (the step loop), train seconds (the step loop), extract
seconds (the mesh extraction), train+extract seconds (the wall time of ``train()``: data loading,
neural point initialisation, the step loop, extraction and writing the mesh; not the one-time op
build, which a warm-up run absorbs), and score seconds (the metrics, not part of the bar).

Bars, per row, all must hold (against the Poisson row of the same shape and input, from
``--poisson``, written by ``benchmarks/poisson.py``): Chamfer-L1 <= Poisson's; F@0.005 >=
Poisson's - 0.005; Hausdorff <= Poisson's; normal consistency > Poisson's on noisy input and
>= Poisson's - 0.005 otherwise; train+extract <= ``--max-seconds`` (default 5, EVAL.md's bar).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neusdf.geometry import Normalization, sample_triangles
from neusdf.mesh_io import atomic_write, load_shape, save_json
from neusdf.metrics import SurfaceSet, compute_metrics

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_MESHES = ROOT.parent / "shared" / "data" / "meshes"
DEFAULT_POISSON = ROOT / "benchmarks" / "poisson_cpu.json"
SHAPES = {
    "bunny": "stanford-bunny.obj",
    "fandisk": "fandisk.obj",
    "rocker-arm": "rocker-arm.obj",
    "armadillo": "armadillo.obj",
    "elephant": "elephant.obj",
    "fertility": "fertility.off",
    "horse": "horse.obj",
}


@dataclass(frozen=True)
class Setting:
    """An input setting: number of points, position noise std (unit box), normals given."""

    num_points: int
    noise: float
    normals: bool


SETTINGS = {
    "dense": Setting(100_000, 0.0, True),
    "sparse": Setting(10_000, 0.0, True),
    "noisy": Setting(100_000, 0.005, True),
    "raw": Setting(100_000, 0.0, False),
}
# Extra Hydra overrides per variant (the model's own config group).
VARIANTS = {"neusdf": [], "mlp": ["model=mlp"]}
# Timing runs: nothing but the run itself (no logging, checkpoints, validation or progress
# bar, no scoring inside the timed part); overwrite: a row's own run directory, replaced on a
# re-run.
TIMING_OVERRIDES = [
    "~logger",
    "~callbacks",
    "+trainer.enable_checkpointing=false",
    "+trainer.limit_val_batches=0",
    "+trainer.enable_progress_bar=false",
    "extract.score=false",
    "overwrite=true",
]
# Tiny CPU runs of train.py in a subprocess, for the scripts' --smoke checks.
SMOKE_OVERRIDES = ["debug=default", "trainer.accelerator=cpu", "model.backend=reference"]
# A run's own clock (metrics.json "timing"), part by part, as the command scripts report it.
RUN_TIMING_KEYS = (
    "load_seconds",
    "init_seconds",
    "fit_seconds",
    "loop_seconds",
    "extract_seconds",
    "save_seconds",
    "metrics_seconds",
)
# Keys of the JSON's run config that must match to add rows to an existing file.
RUN_KEYS = ("steps", "resolution", "backend", "num_query", "num_ref", "override", "smoke")


@dataclass
class BenchInput:
    """One row's input: the normalised ground truth and the points the method sees.

    Attributes:
        shape, setting: names (keys of SHAPES, SETTINGS). seed: the input and scoring seed.
        gt: the ground-truth mesh in the unit box. points: (N, 3) float32.
        normals: (N, 3) float32 unit face normals, or None (raw input).
    """

    shape: str
    setting: str
    seed: int
    gt: SurfaceSet
    points: np.ndarray
    normals: np.ndarray | None


def input_seed(shape: str, setting: str) -> int:
    """The row's seed: fixed by the names only (not by which rows are selected)."""
    return zlib.crc32(f"{shape}/{setting}".encode())


def make_input(
    meshes: str | os.PathLike,
    shape: str,
    setting: str,
    shape_files: dict[str, Path] | None = None,
) -> BenchInput:
    """EVAL.md input for (shape, setting): area-weighted samples of the normalised ground truth
    with face normals, plus N(0, noise) positions; normals dropped for raw input.

    ``shape`` is a key of SHAPES (its file in ``meshes``) or of ``shape_files`` (name -> mesh
    file: shapes beyond the seven, see :func:`parse_shape_files`).

    Deterministic: the same arguments give the same float32 arrays on every machine (numpy's
    PCG64 stream), so the GPU runs and the Poisson baseline see the same points.
    """
    files = shape_files or {}
    gt = load_shape(files[shape] if shape in files else Path(meshes) / SHAPES[shape])
    norm = Normalization.of(gt.points)
    gt_unit = SurfaceSet(norm.to_unit(gt.points), gt.faces)
    s = SETTINGS[setting]
    seed = input_seed(shape, setting)
    rng = np.random.default_rng(seed)
    pts, nrm = sample_triangles(gt_unit.points, gt_unit.faces, s.num_points, rng)
    if s.noise > 0:
        pts = pts + rng.normal(scale=s.noise, size=pts.shape)
    normals = nrm.astype(np.float32) if s.normals else None
    return BenchInput(shape, setting, seed, gt_unit, pts.astype(np.float32), normals)


def write_input(inp: BenchInput, path: str | os.PathLike) -> None:
    """Writes the input as npz: ``points`` and, unless raw, ``normals``."""
    arrays = {"points": inp.points}
    if inp.normals is not None:
        arrays["normals"] = inp.normals
    np.savez(path, **arrays)


def score(recon: SurfaceSet, inp: BenchInput, num_query: int, num_ref: int) -> dict:
    """EVAL.md metrics of ``recon`` (unit-box coordinates) against the row's ground truth."""
    return compute_metrics(recon, inp.gt, num_query=num_query, num_ref=num_ref, seed=inp.seed)


def host_info() -> dict:
    """The CPU machine: platform, processor, core count, threads allowed."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
    }


def failed_bars(setting: str, r: dict, p: dict | None, max_seconds: float) -> list[str]:
    """Names of the bars the row misses (empty: all met); Poisson bars need Poisson's row."""
    fails = []
    if p is None:
        fails.append("no Poisson row")
    elif "error" in p:
        fails.append(f"Poisson bars n/a (Poisson {p['error'][:40]})")
    else:
        if r["chamfer_l1"] > p["chamfer_l1"]:
            fails.append("Chamfer")
        if r["fscore_0.005"] < p["fscore_0.005"] - 0.005:
            fails.append("F@0.005")
        if r["hausdorff"] > p["hausdorff"]:
            fails.append("Hausdorff")
        nc, pnc = r["normal_consistency"], p["normal_consistency"]
        if not (nc > pnc if setting == "noisy" else nc >= pnc - 0.005):
            fails.append("NC")
    if r["total_seconds"] > max_seconds:
        fails.append(f"time > {max_seconds:g} s")
    return fails


def run_one(args, inp: BenchInput, variant: str, workdir: Path) -> dict:
    """Trains and extracts one row; returns metrics and timings."""
    from neusdf.pipeline import train

    name = f"{inp.shape}_{inp.setting}_{variant}"
    path = workdir / f"{inp.shape}_{inp.setting}.npz"
    write_input(inp, path)
    out = workdir / name
    overrides = [f"data.path={path}", *variant_overrides(args, variant)]
    cfg = _compose(overrides, out)
    t0 = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - t0
    recon = load_shape(out / "mesh.ply")
    t1 = time.perf_counter()
    m = score(SurfaceSet(recon.points, recon.faces), inp, args.num_query, args.num_ref)
    t = result["timing"]
    steps = int(t["steps"])
    m.update(
        steps=steps,
        ms_per_step=1000 * t["fit_seconds"] / steps if steps else float("nan"),
        train_seconds=t["fit_seconds"],
        extract_seconds=t["extract_seconds"],
        total_seconds=total,
        score_seconds=time.perf_counter() - t1,
        device=args.device,
        overrides=overrides[1:],
        timing=t,
        input_seed=inp.seed,
        has_normals=inp.normals is not None,
    )
    return m


def _compose(overrides: list[str], out: Path):
    from neusdf.config import compose_train_config

    return compose_train_config(overrides, out)


def variant_overrides(args, variant: str) -> list[str]:
    """Hydra overrides of one variant: the variant's own, then those shared by every run."""
    o = list(VARIANTS[variant])
    if args.accelerator:
        o.append(f"trainer.accelerator={args.accelerator}")
    if args.backend and variant == "neusdf":
        o.append(f"model.backend={args.backend}")
    o += TIMING_OVERRIDES
    if args.resolution:
        o.append(f"extract.resolution={args.resolution}")
    if args.steps:
        o.append(f"trainer.max_steps={args.steps}")
    if args.smoke:
        o += ["data.num_surface=1024", "data.num_near=768", "data.num_space=256"]
        if variant == "neusdf":
            o.append("model.num_points=1024")
    return o + list(args.override)


def warm_up(args, variant: str, workdir: Path) -> None:
    """Builds/loads the op and initialises the device outside the timed runs."""
    from neusdf.pipeline import train

    d = np.random.default_rng(0).normal(size=(4000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    np.savez(workdir / "warmup.npz", points=d, normals=d)
    overrides = [f"data.path={workdir / 'warmup.npz'}", *variant_overrides(args, variant),
                 "trainer.max_steps=20", "extract.resolution=32"]  # fmt: skip
    train(_compose(overrides, workdir / f"warmup_{variant}"))


def row_order(key: str) -> tuple:
    """Sort key of 'shape/setting/variant': the canonical order of the three lists."""
    shape, setting, variant = key.split("/")
    idx = [
        list(d).index(k) if k in d else len(d)
        for d, k in ((SHAPES, shape), (SETTINGS, setting), (VARIANTS, variant))
    ]
    return (*idx, key)


HEADER = (
    "| shape | input | variant | role | Chamfer-L1 x100 | Poisson | NC | Poisson | F@0.005 | "
    "Poisson | F@0.01 | Hausdorff x100 | Poisson | steps | ms/step | s train | s extract | "
    "s train+extract | Poisson s | s score | bars failed |\n" + "|---" * 21 + "|"
)


def fmt_row(key: str, r: dict, poisson: dict, tuned_on: set, max_seconds: float) -> str:
    """One markdown row: ours next to Poisson's, and the bars it fails."""
    shape, setting, variant = key.split("/")
    role = "tuned" if shape in tuned_on else "confirm"
    lead = f"| {shape} | {setting} | {variant} | {role} |"
    if "error" in r:
        err = " ".join(r["error"].split())[:100].replace("|", "/")
        return lead + f" FAILED: {err} |" + " |" * 16
    p = poisson.get(f"{shape}/{setting}")
    pv = p if p is not None and "error" not in p else None

    def pc(k, f, scale=1.0):
        return f"{scale * pv[k]:{f}}" if pv is not None else "-"

    fails = failed_bars(setting, r, p, max_seconds)
    psec = pc("seconds", ".1f")
    if p is not None and p.get("timeout"):
        psec = f"> {p['seconds']:g}"
    return (
        f"{lead} {100 * r['chamfer_l1']:.3f} | {pc('chamfer_l1', '.3f', 100)} | "
        f"{r['normal_consistency']:.4f} | {pc('normal_consistency', '.4f')} | "
        f"{r['fscore_0.005']:.3f} | {pc('fscore_0.005', '.3f')} | {r['fscore_0.01']:.3f} | "
        f"{100 * r['hausdorff']:.2f} | {pc('hausdorff', '.2f', 100)} | {r['steps']} | "
        f"{r['ms_per_step']:.2f} | {r['train_seconds']:.1f} | {r['extract_seconds']:.1f} | "
        f"{r['total_seconds']:.1f} | {psec} | {r['score_seconds']:.1f} | "
        f"{', '.join(fails) or 'none'} |"
    )


def load_poisson(path: str | None) -> tuple[dict, str]:
    """Poisson rows keyed 'shape/setting' and a line naming the machine that measured them."""
    if path is None or not Path(path).exists():
        return {}, f"Poisson: no rows ({path} not found; run benchmarks/poisson.py)"
    with open(path) as f:
        data = json.load(f)
    h = data.get("host", {})
    line = (
        f"Poisson columns: CPU, {h.get('processor', '?')}, {h.get('cpu_count', '?')} cores, "
        f"{h.get('threads', '?')} threads, {h.get('platform', '?')}, Open3D "
        f"{h.get('open3d', '?')} (`{Path(path).name}`)"
    )
    return data.get("rows", {}), line


def make_table(results: dict, poisson: dict, poisson_line: str, tuned_on: set, max_s: float):
    """The markdown table of every row in ``results`` with its header lines."""
    runs = results["runs"]
    keys = sorted(runs, key=row_order)
    devices = sorted({runs[k].get("device", "?") for k in keys if "error" not in runs[k]})
    c = results["config"]
    head = (
        f"Our columns: {'; '.join(devices) or 'no finished rows'} (torch "
        f"{results.get('torch', '?')}); steps {c.get('steps') or 'config default'}, "
        f"resolution {c.get('resolution') or 'config default'}, reference samples "
        f"{c.get('num_ref')}, extra overrides {c.get('override') or 'none'}.\n"
        f"{poisson_line}.\nBars: Chamfer <= Poisson, F@0.005 >= Poisson - 0.005, Hausdorff <= "
        f"Poisson, NC > Poisson (noisy) / >= Poisson - 0.005, train+extract <= {max_s:g} s.\n"
    )
    rows = [fmt_row(k, runs[k], poisson, tuned_on, max_s) for k in keys]
    return head + "\n" + HEADER + "\n" + "\n".join(rows)


def parse_inputs(ap: argparse.ArgumentParser, arg: str, text: str) -> list[tuple[str, str]]:
    """``shape/setting`` items of a comma list as (shape, setting); ``ap.error`` names a bad
    one."""
    inputs = []
    for item in filter(None, text.split(",")):
        shape, _, setting = item.partition("/")
        if shape not in SHAPES or setting not in SETTINGS:
            ap.error(f"{arg}: '{item}' is not shape/setting ({list(SHAPES)}, {list(SETTINGS)})")
        inputs.append((shape, setting))
    if not inputs:
        ap.error(f"{arg}: expected shape/setting items, e.g. bunny/dense")
    return inputs


def build_op(python: str) -> None:
    """Builds the op with ``python`` before timed runs (so that no run counts the build)."""
    subprocess.run([python, "-m", "neusdf.ops.build"], check=True, cwd=ROOT)


def parse_shape_files(ap, entries: list[str]) -> dict[str, Path]:
    """``--shape-file NAME=PATH`` entries: shapes beyond the seven (e.g. held out from every
    choice of settings), name -> mesh file. Errors name the entry."""
    files: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path or "/" in name:
            ap.error(f"--shape-file: expected NAME=PATH (NAME without '/'), got '{entry}'")
        if name in SHAPES or name in files:
            ap.error(f"--shape-file: the name '{name}' is taken")
        if not Path(path).is_file():
            ap.error(f"--shape-file {entry}: no such file")
        files[name] = Path(path)
    return files


def split_names(ap, arg: str, text: str, known) -> list[str]:
    """The comma list ``text`` of option ``arg``; an unknown name is an error naming it."""
    items = [s for s in text.split(",") if s]
    for s in items:
        if s not in known:
            ap.error(f"{arg}: unknown name '{s}', expected some of {list(known)}")
    return items


def add_shape_arguments(ap) -> None:
    """``--shapes`` and ``--shape-file``, as this script and ``poisson.py`` take them."""
    ap.add_argument("--shapes", default=None, help="comma list (default: all, --shape-file too)")
    ap.add_argument(
        "--shape-file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a further shape (repeatable); quality.py compares it with poisson.py's rows of "
        "the same name",
    )


def selected_shapes(ap, args) -> tuple[list[str], dict[str, Path]]:
    """The shapes ``--shapes`` selects (default: the seven and every ``--shape-file``) and the
    ``--shape-file`` shapes (name -> mesh file)."""
    shape_files = parse_shape_files(ap, args.shape_file)
    known = {**SHAPES, **shape_files}
    return split_names(ap, "--shapes", args.shapes or ",".join(known), known), shape_files


def main() -> int:
    """CLI; returns the exit status (0 when every selected row finished, 1 otherwise)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", help="output JSON (rows already in it are kept and skipped)")
    add_shape_arguments(ap)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list (default: all)")
    ap.add_argument("--variants", default="neusdf", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: config)")
    ap.add_argument("--resolution", type=int, default=None, help="default: config")
    ap.add_argument("--meshes", default=str(DEFAULT_MESHES), help="folder of the seven meshes")
    ap.add_argument("--poisson", default=str(DEFAULT_POISSON), help="benchmarks/poisson.py JSON")
    ap.add_argument("--backend", default=None, choices=["compiled", "reference"])
    ap.add_argument("--accelerator", default=None, help="gpu or cpu (default: gpu if available)")
    ap.add_argument("--num-query", type=int, default=100_000)
    ap.add_argument("--num-ref", type=int, default=1_000_000, help="lower it for smoke runs")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="train+extract bar")
    ap.add_argument("--tuned-on", default="", help="shapes the config was chosen on")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--workdir", default=None, help="keep inputs and meshes here (default: tmp)")
    ap.add_argument("--redo", action="store_true", help="re-run selected rows already present")
    ap.add_argument("--overwrite", action="store_true", help="start a fresh JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run to test the script")
    args = ap.parse_args()

    shapes, shape_files = selected_shapes(ap, args)
    settings = split_names(ap, "--settings", args.settings, SETTINGS)
    variants = split_names(ap, "--variants", args.variants, VARIANTS)
    tuned_on = set(split_names(ap, "--tuned-on", args.tuned_on, {**SHAPES, **shape_files}))

    import torch

    if args.accelerator is None:
        args.accelerator = "gpu" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.steps = args.steps or 30
        args.resolution = min(args.resolution or 64, 64)
        args.num_query, args.num_ref = min(args.num_query, 20_000), min(args.num_ref, 100_000)
    if args.accelerator == "gpu":
        args.device = torch.cuda.get_device_name()
    else:
        args.device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    config = {k: getattr(args, k) for k in RUN_KEYS}
    results: dict = {"config": config, "torch": torch.__version__, "runs": {}}
    if Path(args.json).exists() and not args.overwrite:
        with open(args.json) as f:
            results = json.load(f)
        old = {k: results.get("config", {}).get(k) for k in RUN_KEYS}
        if old != config:
            ap.error(
                f"{args.json} was made with {old}, this run is {config}: pass --overwrite "
                "or write another file"
            )
    for p in filter(None, (args.json, args.markdown)):
        if not Path(p).resolve().parent.is_dir():
            ap.error(f"{p}: its folder does not exist")
    poisson, poisson_line = load_poisson(args.poisson)
    torch.set_float32_matmul_precision("high")

    todo = [
        f"{shape}/{setting}/{variant}"
        for shape in shapes
        for setting in settings
        for variant in variants
    ]
    runs = results["runs"]
    skip = [k for k in todo if k in runs and "error" not in runs[k] and not args.redo]
    if skip:
        print(f"kept from {args.json} (--redo to re-run): {', '.join(skip)}")
    todo = [k for k in todo if k not in skip]
    with tempfile.TemporaryDirectory(prefix="neusdf-quality-") as tmp:
        # --workdir keeps the inputs and meshes for inspection; by default they are temporary
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        warm = set()
        for key in todo:
            shape, setting, variant = key.split("/")
            print(f"== {key}", flush=True)
            try:
                if variant not in warm:
                    t0 = time.perf_counter()
                    warm_up(args, variant, workdir)
                    results.setdefault("warmup_seconds", {})[variant] = time.perf_counter() - t0
                    warm.add(variant)
                inp = make_input(args.meshes, shape, setting, shape_files)
                r = run_one(args, inp, variant, workdir)
            except Exception as e:  # keep the rest of the table; the JSON has the trace
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            runs[key] = r
            print(fmt_row(key, r, poisson, tuned_on, args.max_seconds), flush=True)
            save_json(args.json, results, overwrite=True)
    table = make_table(results, poisson, poisson_line, tuned_on, args.max_seconds)
    print(table)
    if args.markdown:
        atomic_write(args.markdown, (table + "\n").encode(), overwrite=True)
    selected = [runs[k] for k in todo]
    return 0 if all("error" not in r for r in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
