"""Checkpoint -> mesh in the input's coordinates, optionally scored against a reference shape.

The grid evaluation and marching cubes are :func:`neusdf.meshing.extract_mesh`; options come
from ``configs/extract.yaml``. The extraction command::

    python -m neusdf.extract ckpt=outputs/.../checkpoints/last.ckpt resolution=512 \\
        [output=<run dir>/last_mesh512.ply] [reference=shape.obj] [metrics=<output>.metrics.json]
        [overwrite=true]
        [device=auto|cpu|cuda] [backend=compiled|reference] [chunk=262144] [band=2.0]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from neusdf.checkpoint import CheckpointError, load_checkpoint
from neusdf.config import CONFIG_DIR, compose_config
from neusdf.mesh_io import ShapeError, check_writable, load_shape, save_json, save_mesh
from neusdf.meshing import extract_mesh, trim_of
from neusdf.metrics import SurfaceSet, evaluate, format_table

__all__ = ["main", "run_directory"]


def run_directory(ckpt: Path) -> Path:
    """The run directory of a checkpoint: the parent of ``checkpoints/``, else its folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _check_types(cfg: DictConfig) -> None:
    """Raises ValueError for a value whose type differs from its default's in extract.yaml."""
    defaults = OmegaConf.load(CONFIG_DIR / "extract.yaml")
    for key in defaults:
        if key == "defaults" or OmegaConf.is_missing(defaults, key) or defaults[key] is None:
            continue
        kind = type(defaults[key])
        value = cfg[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{key} must be of type {kind.__name__}, got {value!r}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (messages, not tracebacks, on bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose_config("extract", list(argv))
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise ValueError("ckpt is required: python -m neusdf.extract ckpt=PATH [...]")
        _check_types(cfg)
    except Exception as e:  # Hydra's messages name the key; drop its traceback
        print(f"error: {e}".splitlines()[0] + "\n" + __doc__.split("::", 1)[1], file=sys.stderr)
        return 2
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = Path(cfg.ckpt)
    default = run_directory(ckpt) / f"{ckpt.stem}_mesh{cfg.resolution}.ply"
    output = Path(cfg.output or default)
    metrics_path = Path(cfg.metrics or output.with_suffix(".metrics.json"))
    try:
        check_writable(output, cfg.overwrite)
        if cfg.reference:
            check_writable(metrics_path, cfg.overwrite)
            try:
                reference = load_shape(cfg.reference)
            except ShapeError as e:
                raise ShapeError(f"reference: {e}") from None
        loaded = load_checkpoint(ckpt, device, backend=cfg.backend)
        verts, faces, stats = extract_mesh(
            loaded.net,
            cfg.resolution,
            loaded.box,
            device,
            cfg.chunk,
            band=cfg.band,
            trim=trim_of(loaded.net) if cfg.trim else None,
        )
    except (CheckpointError, ShapeError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verts = loaded.normalization.from_unit(verts)
    save_mesh(output, verts, faces, overwrite=cfg.overwrite)
    print(
        f"wrote {output}: {len(verts)} vertices, {len(faces)} faces; {stats.seconds_total:.1f} s "
        f"({stats.evaluated / stats.total:.1%} of {cfg.resolution}^3 grid points evaluated)"
    )
    if cfg.reference:
        recon = SurfaceSet(verts, faces)
        m = evaluate(
            recon,
            SurfaceSet.from_shape(reference),
            num_query=cfg.num_query,
            num_ref=cfg.num_ref,
        )
        scores = {k: v for k, v in m.items() if isinstance(v, float)}
        print(format_table({output.name: scores}))
        save_json(metrics_path, m, overwrite=cfg.overwrite)
        print(f"wrote {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
