"""Fits a neural SDF to one shape, extracts its mesh and scores it (Hydra entry point).

    python train.py                                   # the default shape, sized for the device
    python train.py data.path=scan.ply model.num_points=16384 model.K=8 trainer.max_steps=3000
    python train.py debug=fdr                         # one step of everything
    python train.py trainer=ddp trainer.devices=2     # data parallel (Lightning DDP)

Outputs go to the run directory (``outputs/train/runs/<date>_<time>/``): checkpoints
(``checkpoints/last.ckpt``, ``best.ckpt``), TensorBoard logs, ``mesh.ply`` in the input's
coordinates and ``metrics.json`` (EVAL.md metrics against the input, plus timings).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from neusdf.config import register_resolvers
from neusdf.data import ShapeDataModule
from neusdf.extract import extract_mesh
from neusdf.mesh_io import ShapeError, check_writable, save_mesh
from neusdf.metrics import SurfaceSet, evaluate, format_table, save_json
from neusdf.model import PointInit
from neusdf.module import CheckpointError, SDFModule

log = logging.getLogger("neusdf.train")
register_resolvers()


def _build_op(backend: str) -> None:
    """Builds the compiled op once, before Lightning starts any other rank."""
    if backend != "compiled":
        return
    from neusdf.ops.build import load_library

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


def train(cfg: DictConfig) -> dict | None:
    """Trains, then (on rank 0) extracts the mesh and computes metrics.

    Args:
        cfg: the composed config (configs/train.yaml).

    Returns:
        On rank 0, the metrics dict (EVAL.md metrics against the input unless
        ``extract.score`` is false, plus ``timing`` and ``input``); None on other ranks.

    Raises:
        ShapeError, CheckpointError, FileExistsError, ValueError: bad input, with a message
        naming the option or file.
    """
    # NVLink multicast (NVLS) is off for every NCCL job of this project (see KINDS.md).
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir = Path(cfg.paths.output_dir)
    mesh_path = out_dir / f"mesh.{cfg.extract.format}"
    metrics_path = out_dir / "metrics.json"
    for p in (mesh_path, metrics_path):
        check_writable(p, cfg.overwrite)
    _check_checkpoint_dir(cfg)

    dm: ShapeDataModule = instantiate(cfg.data)
    dm.load()
    _build_op(cfg.model.backend)
    surface = dm.surface
    init = PointInit(
        surface.points.numpy(), None if surface.normals is None else surface.normals.numpy()
    )
    net = instantiate(cfg.model, init=init)
    norm = dm.normalization
    module = SDFModule(
        net,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        sampling=dm.sampling,
        validation=OmegaConf.to_container(cfg.validation, resolve=True),
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
        dm.path, net.num_points, "with" if dm.has_normals else "WITHOUT", trainer.max_steps,
    )  # fmt: skip

    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    fit_s = time.perf_counter() - t0
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and getattr(ckpt_cb, "save_last", False):
        # Lightning writes last.ckpt at validation and epoch ends; the step loader never ends
        # an epoch, so the final state is saved here (on rank 0; every rank joins the barrier).
        trainer.save_checkpoint(Path(ckpt_cb.dirpath) / f"{ckpt_cb.CHECKPOINT_NAME_LAST}.ckpt")
    if trainer.global_rank != 0:
        return None

    # Lightning moves the module back to the CPU when fit ends; extract on the training device.
    device = trainer.strategy.root_device
    net = module.net.to(device).eval()
    verts, faces, stats = extract_mesh(
        net, cfg.extract.resolution, dm.sampling["box"], device, cfg.extract.chunk,
        band=cfg.extract.band,
    )  # fmt: skip
    verts = norm.from_unit(verts)
    save_mesh(mesh_path, verts, faces, overwrite=cfg.overwrite)
    t1 = time.perf_counter()
    metrics: dict = {}
    if cfg.extract.score:
        metrics = evaluate(
            SurfaceSet(verts, faces), SurfaceSet.from_shape(dm.shape),
            num_query=cfg.extract.num_query, num_ref=cfg.extract.num_ref,
        )  # fmt: skip
    steps = trainer.global_step
    metrics["timing"] = {
        "fit_seconds": fit_s,
        "steps": steps,
        "steps_per_second": steps / fit_s if fit_s > 0 else float("nan"),
        "extract_seconds": stats.seconds_total,
        "extract_resolution": int(cfg.extract.resolution),
        "extract_evaluated_fraction": stats.evaluated / stats.total,
        "metrics_seconds": time.perf_counter() - t1,
    }
    metrics["input"] = {"path": dm.path, "has_normals": dm.has_normals}
    save_json(metrics_path, metrics, overwrite=cfg.overwrite)
    scores = {k: v for k, v in metrics.items() if isinstance(v, float)}
    if scores:
        print(format_table({Path(dm.path).name: scores}))
    print(
        f"train {fit_s:.1f} s ({metrics['timing']['steps_per_second']:.1f} steps/s), "
        f"extract {stats.seconds_total:.1f} s at {cfg.extract.resolution}^3\n"
        f"mesh: {mesh_path}\nmetrics: {metrics_path}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: runs :func:`train`, turning bad input into a one-line error."""
    try:
        train(cfg)
    except (ShapeError, CheckpointError, FileExistsError, ValueError) as e:
        if os.environ.get("NEUSDF_DEBUG") == "1":
            raise
        log.error("error: %s", e)
        sys.exit(1)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
