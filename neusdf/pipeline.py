"""Config -> trained run: fit a neural SDF to one shape, extract its mesh and score it.

:func:`train` is the whole run, in three steps that can also be called on their own:
:func:`build` (data, network, Lightning module and trainer), :func:`fit` and :func:`finalise`
(mesh, metrics and ``metrics.json`` on rank 0). :func:`main` is the Hydra command-line entry
(``train.py`` at the checkout's root and the ``neusdf-train`` command)::

    python train.py                                   # the default shape, sized for the device
    python train.py data.path=scan.ply model.num_points=16384 model.K=8 trainer.max_steps=3000
    python train.py debug=fdr                         # one step of everything
    python train.py trainer=ddp trainer.devices=2     # data parallel (Lightning DDP)

Outputs go to the run directory (``outputs/train/runs/<date>_<time>/``): checkpoints
(``checkpoints/last.ckpt``, ``best.ckpt``), TensorBoard logs, ``mesh.ply`` in the input's
coordinates and ``metrics.json`` (reconstruction metrics against the input, plus timings).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from neusdf.adapt import resolve_auto
from neusdf.checkpoint import CheckpointError
from neusdf.config import CONFIG_DIR, configure_runtime, register_resolvers
from neusdf.data import ShapeDataModule
from neusdf.mesh_io import ShapeError, check_writable, save_json, save_mesh
from neusdf.meshing import extract_mesh
from neusdf.metrics import SurfaceSet, evaluate, format_table
from neusdf.model import PointInit
from neusdf.module import SDFModule
from neusdf.ops.build import load_library

__all__ = ["Run", "build", "check_outputs", "finalise", "fit", "main", "train"]

log = logging.getLogger("neusdf.train")
register_resolvers()


@dataclass
class Run:
    """What :func:`build` makes: the data, the module around the network, the trainer."""

    data: ShapeDataModule
    module: SDFModule
    trainer: L.Trainer


def _build_op(backend: str) -> None:
    """Builds the compiled op once, before Lightning starts any other rank."""
    if backend != "compiled":
        return
    t0 = time.perf_counter()
    load_library()
    log.info("compiled op ready (%.1f s)", time.perf_counter() - t0)


def _check_checkpoint_dir(cfg: DictConfig) -> None:
    """Refuses to write checkpoints over an earlier run's, unless resuming from that run."""
    cb = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if cb is None or cfg.overwrite:
        return
    ckpt_dir = Path(cb.dirpath)
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    resuming_here = cfg.ckpt_path is not None and Path(cfg.ckpt_path).parent == ckpt_dir
    if existing and not resuming_here:
        raise FileExistsError(
            f"'{ckpt_dir}' already holds checkpoints ({existing[0].name}, ...); "
            "pass overwrite=true to replace them or ckpt_path=... to resume"
        )


def _output_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """The run's mesh and metrics files."""
    out_dir = Path(cfg.paths.output_dir)
    return out_dir / f"mesh.{cfg.extract.format}", out_dir / "metrics.json"


def check_outputs(cfg: DictConfig) -> None:
    """Refuses (FileExistsError) to replace an earlier run's outputs without ``overwrite``."""
    for p in _output_paths(cfg):
        check_writable(p, cfg.overwrite)
    _check_checkpoint_dir(cfg)


def _container(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def build(cfg: DictConfig) -> Run:
    """Loads the shape, builds the op (if compiled), the network, module and trainer."""
    dm: ShapeDataModule = instantiate(cfg.data)
    dm.load()
    resolve_auto(cfg, dm.stats)
    _build_op(cfg.model.backend)
    surface = dm.surface
    init = PointInit(
        surface.points.numpy(), None if surface.normals is None else surface.normals.numpy()
    )
    net = instantiate(cfg.model, init=init)
    norm = dm.normalization
    module = SDFModule(
        net,
        model=_container(cfg.model),
        loss=_container(cfg.loss),
        optim=_container(cfg.optim),
        sampling=dm.sampling,
        validation=_container(cfg.validation),
        center=tuple(float(x) for x in norm.center),
        scale=norm.scale,
        seed=cfg.seed,
    )
    module.set_surface(surface)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log.info(
        "training on %s: %d neural points, %s normals, %d steps",
        dm.path,
        net.num_points,
        "the file's" if dm.has_normals else "estimated",
        trainer.max_steps,
    )
    return Run(dm, module, trainer)


def fit(run: Run, ckpt_path: str | None = None) -> float:
    """Trains (resuming from ``ckpt_path`` if given); saves ``last.ckpt``; returns seconds."""
    t0 = time.perf_counter()
    run.trainer.fit(run.module, datamodule=run.data, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - t0
    ckpt_cb = run.trainer.checkpoint_callback
    if ckpt_cb is not None and getattr(ckpt_cb, "save_last", False):
        # Lightning writes last.ckpt at validation and epoch ends; the step loader never ends
        # an epoch, so the final state is saved here (on rank 0; every rank joins the barrier).
        last = Path(ckpt_cb.dirpath) / f"{ckpt_cb.CHECKPOINT_NAME_LAST}.ckpt"
        run.trainer.save_checkpoint(last)
    return seconds


def finalise(run: Run, cfg: DictConfig, fit_seconds: float) -> dict:
    """Extracts the mesh, scores it and writes ``mesh.<format>`` and ``metrics.json``.

    Call on rank 0 only. Returns the metrics (scores unless ``extract.score`` is false, plus
    ``timing`` and ``input``).
    """
    dm, trainer, x = run.data, run.trainer, cfg.extract
    mesh_path, metrics_path = _output_paths(cfg)
    # Lightning moves the module back to the CPU when fit ends; extract on the training device.
    device = trainer.strategy.root_device
    net = run.module.net.to(device).eval()
    verts, faces, stats = extract_mesh(
        net,
        x.resolution,
        dm.sampling.box,
        device,
        x.chunk,
        band=x.band,
        keep=net.near_data if x.trim else None,
    )
    verts = dm.normalization.from_unit(verts)
    save_mesh(mesh_path, verts, faces, overwrite=cfg.overwrite)
    t1 = time.perf_counter()
    metrics: dict = {}
    if x.score:
        metrics = evaluate(
            SurfaceSet(verts, faces),
            SurfaceSet.from_shape(dm.shape),
            num_query=x.num_query,
            num_ref=x.num_ref,
        )
    steps = trainer.global_step
    metrics["timing"] = {
        "fit_seconds": fit_seconds,
        "steps": steps,
        "steps_per_second": steps / fit_seconds if fit_seconds > 0 else float("nan"),
        "extract_seconds": stats.seconds_total,
        "extract_resolution": int(x.resolution),
        "extract_evaluated_fraction": stats.evaluated / stats.total,
        "metrics_seconds": time.perf_counter() - t1,
    }
    metrics["input"] = {
        "path": dm.path,
        "has_normals": dm.has_normals,
        "spacing": dm.stats.spacing,
        "noise": dm.stats.noise,
    }
    save_json(metrics_path, metrics, overwrite=cfg.overwrite)
    scores = {k: v for k, v in metrics.items() if isinstance(v, float)}
    if scores:
        print(format_table({Path(dm.path).name: scores}))
    print(
        f"train {fit_seconds:.1f} s ({metrics['timing']['steps_per_second']:.1f} steps/s), "
        f"extract {stats.seconds_total:.1f} s at {x.resolution}^3\n"
        f"mesh: {mesh_path}\nmetrics: {metrics_path}"
    )
    return metrics


def train(cfg: DictConfig) -> dict | None:
    """Trains, then (on rank 0) extracts the mesh and computes metrics.

    Sets the process-wide runtime first (:func:`neusdf.config.configure_runtime`).

    Args:
        cfg: the composed config (``configs/train.yaml``).

    Returns:
        On rank 0, the metrics dict (reconstruction metrics against the input unless
        ``extract.score`` is false, plus ``timing`` and ``input``); None on other ranks.

    Raises:
        ShapeError, CheckpointError, FileExistsError, ValueError: bad input, with a message
        naming the option or file.
    """
    configure_runtime()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_outputs(cfg)
    run = build(cfg)
    fit_seconds = fit(run, cfg.ckpt_path)
    if run.trainer.global_rank != 0:
        return None
    return finalise(run, cfg, fit_seconds)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: runs :func:`train`, turning bad input into a one-line error."""
    try:
        train(cfg)
    except (ShapeError, CheckpointError, FileExistsError, ValueError) as e:
        if os.environ.get("NEUSDF_DEBUG") == "1":
            raise
        log.error("error: %s", e)
        sys.exit(1)
