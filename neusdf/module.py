"""Lightning module: samples on the device, losses, optimiser, validation with mesh metrics.

Checkpoints carry everything needed to rebuild the SDF without the training data: the model
config (``hparams.model``), the number of neural points, and the unit-box normalisation
(buffers), so :func:`load_checkpoint` works on any machine and number of devices.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neusdf.data import Normalization, SurfaceSamples, draw_samples
from neusdf.extract import extract_mesh
from neusdf.losses import sdf_and_gradient, sdf_losses
from neusdf.metrics import SurfaceSet, compute_metrics
from neusdf.model import NeuralPointSDF

__all__ = ["SDFModule", "CheckpointError", "LoadedSDF", "load_checkpoint", "section_image"]

log = logging.getLogger(__name__)

# Model options that do not change the parameters' meaning: a checkpoint loads across them.
_PORTABLE_MODEL_KEYS = {"backend", "chunk", "seed", "_target_"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another model configuration."""


class SDFModule(L.LightningModule):
    """Trains a :class:`neusdf.model.NeuralPointSDF` on one shape.

    Args:
        net: the SDF network (neural points already initialised from the shape).
        model: the model config it was built from (stored to rebuild it from a checkpoint).
        loss: loss weights (``surface``, ``normal``, ``eikonal``, ``offsurface``, ``near``) and
            ``offsurface_alpha``.
        optim: ``lr`` (decoder), ``lr_points``, ``lr_features``, ``lr_gaussians``,
            ``warmup_steps``, ``final_lr_ratio`` (cosine decay to lr * ratio at max_steps).
        sampling: ``surface``, ``space``, ``near`` counts per step, ``near_sigmas``, ``box``
            (half-size of the unit-box domain).
        validation: ``resolution`` (coarse mesh), ``num_query`` / ``num_ref`` metric samples,
            ``section_resolution`` (image), ``log_mesh``.
        center / scale: the data normalisation (unit = (x - center) / scale).
        seed: base seed of the per-rank sample generator (rank r uses seed + r).
    """

    def __init__(
        self,
        net: NeuralPointSDF,
        model: dict,
        loss: dict,
        optim: dict,
        sampling: dict,
        validation: dict,
        center: tuple[float, float, float] = (0.0, 0.0, 0.0),
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.register_buffer("center", torch.tensor(center, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.loss_weights = {k: float(v) for k, v in loss.items() if k != "offsurface_alpha"}
        self._generator: torch.Generator | None = None
        self.surface: SurfaceSamples | None = None

    def set_surface(self, surface: SurfaceSamples) -> None:
        """Attaches the dense surface sample (kept out of checkpoints, moved with the module)."""
        self.surface = surface
        self.register_buffer("bank_points", surface.points, persistent=False)
        self.register_buffer("bank_normals", surface.normals, persistent=False)  # may be None

    @property
    def normalization(self) -> Normalization:
        """The unit-box normalisation of the training data."""
        return Normalization(self.center.cpu().numpy(), float(self.scale))

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        """Creates this rank's sample generator on the training device."""
        if self.surface is None:
            raise RuntimeError("SDFModule.set_surface must be called before fitting")
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(self.hparams.seed) + self.global_rank)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """One step on freshly drawn samples; logs ``train/loss`` and ``train/loss_<term>``."""
        s = self.hparams.sampling
        b = draw_samples(
            self.bank_points, self.bank_normals, s["surface"], s["space"], s["near"],
            tuple(s["near_sigmas"]), s["box"], self._generator,
        )  # fmt: skip
        q = torch.cat([b["surface"], b["near"], b["space"]])
        sdf, grad = sdf_and_gradient(self.net, q)
        sizes = [s["surface"], s["near"], s["space"]]
        names = ("surface", "near", "space")
        sdfs = dict(zip(names, sdf.split(sizes), strict=True))
        grads = dict(zip(names, grad.split(sizes), strict=True))
        terms = sdf_losses(
            sdfs, grads, b["surface_normals"], b["near_offset"], self.loss_weights,
            self.hparams.loss.get("offsurface_alpha", 100.0),
        )  # fmt: skip
        logs = {f"train/loss_{k}": v.detach() for k, v in terms.items() if k != "loss"}
        logs["train/loss"] = terms["loss"].detach()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False, batch_size=1)
        return terms["loss"]

    def configure_optimizers(self):
        """Adam with per-group learning rates; linear warmup then cosine decay per step."""
        o = self.hparams.optim
        groups = [
            {"params": [self.net.points], "lr": o["lr_points"], "name": "points"},
            {"params": [self.net.features], "lr": o["lr_features"], "name": "features"},
            {"params": [self.net.log_scales, self.net.quats], "lr": o["lr_gaussians"],
             "name": "gaussians"},
            {"params": list(self.net.mlp.parameters()), "lr": o["lr"], "name": "decoder"},
        ]  # fmt: skip
        # the fused kernel updates every parameter in one launch (CUDA only)
        opt = torch.optim.Adam(groups, fused=self.device.type == "cuda")
        total = max(int(self.trainer.max_steps), 1)
        warmup, final = int(o.get("warmup_steps", 0)), float(o.get("final_lr_ratio", 0.05))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min((step - warmup) / max(total - warmup, 1), 1.0)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx: int) -> None:
        """Rank 0 extracts a coarse mesh and scores it; the numbers are broadcast to all ranks.

        Logs ``val/<metric>`` (unit-box units), ``val/eikonal_residual`` (mean ||grad| - 1| on
        uniform samples; why inference mode is off), an SDF cross-section and the mesh.
        """
        v = self.hparams.validation
        keys = ("chamfer_l1", "normal_consistency", "fscore_0.005", "fscore_0.01", "hausdorff")
        values = torch.full((len(keys) + 1,), float("nan"), device=self.device)
        if self.global_rank == 0:
            gen = torch.Generator(device=self.device).manual_seed(12345)
            box = self.hparams.sampling["box"]
            q = torch.rand(v["num_query"] // 4, 3, device=self.device, generator=gen) * 2 - 1
            _, grad = sdf_and_gradient(self.net, q * box, create_graph=False)
            values[-1] = (grad.norm(dim=-1) - 1).abs().mean()
            try:
                verts, faces, _ = extract_mesh(
                    self.net, v["resolution"], box, self.device, progress=False
                )
                gt = SurfaceSet(
                    self.bank_points.cpu().numpy(),
                    normals=None if self.bank_normals is None else self.bank_normals.cpu().numpy(),
                )
                m = compute_metrics(SurfaceSet(verts, faces), gt, v["num_query"], v["num_ref"])
                values[: len(keys)] = torch.tensor([m[k] for k in keys], device=self.device)
                self._log_visuals(verts, faces)
            except ValueError as e:  # no surface yet: log NaN metrics, keep training
                log.warning("validation at step %d: %s", self.global_step, e)
        values = self.trainer.strategy.broadcast(values, src=0)
        for k, x in zip((*keys, "eikonal_residual"), values, strict=True):
            self.log(
                f"val/{k}",
                x,
                on_epoch=True,
                sync_dist=False,
                prog_bar=k == "chamfer_l1",
                batch_size=1,
            )

    def _log_visuals(self, verts: np.ndarray, faces: np.ndarray) -> None:
        """Cross-section image and mesh to TensorBoard (skipped for other loggers)."""
        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image"):
            return
        v = self.hparams.validation
        img = section_image(self.net, v["section_resolution"], self.hparams.sampling["box"],
                            self.device)  # fmt: skip
        try:
            writer.add_image("val/sdf_section_z0", img, self.global_step, dataformats="HWC")
            if v.get("log_mesh", True):
                writer.add_mesh(
                    "val/mesh",
                    vertices=torch.as_tensor(verts, dtype=torch.float32)[None],
                    faces=torch.as_tensor(faces, dtype=torch.int32)[None],
                    global_step=self.global_step,
                )
        except ImportError as e:  # image encoding needs Pillow; metrics are logged regardless
            log.warning("TensorBoard image/mesh logging skipped: %s", e)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Records the neural point count so the net can be rebuilt without the data."""
        checkpoint["neusdf"] = {"num_points": self.net.num_points}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuses checkpoints of another model configuration with a readable message."""
        check_compatible(checkpoint, dict(self.hparams.model), self.net.num_points)


def check_compatible(checkpoint: dict, model_cfg: dict, num_points: int | None) -> None:
    """Raises :class:`CheckpointError` when ``checkpoint`` was trained with another model.

    Args:
        checkpoint: a loaded Lightning checkpoint dict.
        model_cfg: the model config of this run. num_points: this run's P (None: any).
    """
    theirs = dict(checkpoint.get("hyper_parameters", {}).get("model", {}))
    if not theirs or "neusdf" not in checkpoint:
        raise CheckpointError("the checkpoint was not written by neusdf's SDFModule")
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k)!r}, this run {model_cfg.get(k)!r}"
        for k in sorted(set(theirs) | set(model_cfg))
        if k not in _PORTABLE_MODEL_KEYS and theirs.get(k) != model_cfg.get(k)
    ]
    theirs_p = checkpoint["neusdf"]["num_points"]
    if num_points is not None and theirs_p != num_points:
        diffs.append(f"neural points: checkpoint {theirs_p}, this run {num_points}")
    if diffs:
        raise CheckpointError(
            "the checkpoint comes from another model configuration:\n  " + "\n  ".join(diffs)
        )


@dataclass
class LoadedSDF:
    """An SDF rebuilt from a checkpoint: the net (eval mode), normalisation and domain box."""

    net: NeuralPointSDF
    normalization: Normalization
    box: float
    hparams: dict


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    backend: str | None = None) -> LoadedSDF:  # fmt: skip
    """Rebuilds the SDF of a checkpoint on ``device`` (any device count; no data needed).

    Args:
        path: a ``.ckpt`` written by training. device: where to put the net.
        backend: override the op backend ('compiled' or 'reference'); default: the stored one.

    Raises:
        CheckpointError: missing/unreadable file or not a neusdf checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt: file '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors vary; name the file instead
        raise CheckpointError(f"ckpt: '{path}' could not be read as a checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "neusdf" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt: '{path}' was not written by neusdf's SDFModule")
    hp = ckpt["hyper_parameters"]
    model_cfg = OmegaConf.create(dict(hp["model"]))
    if backend is not None:
        model_cfg.backend = backend
    net = instantiate(model_cfg, num_points=ckpt["neusdf"]["num_points"], init=None)
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"ckpt: '{path}' does not match its own model config ({e})") from e
    sd = ckpt["state_dict"]
    norm = Normalization(sd["center"].numpy(), float(sd["scale"]))
    return LoadedSDF(net.to(device).eval(), norm, float(hp["sampling"]["box"]), hp)


def section_image(
    fn, resolution: int, box: float, device: torch.device | str, axis: int = 2
) -> np.ndarray:
    """An RGB image of the SDF on the plane through the origin normal to ``axis``.

    Blue inside, red outside (saturating at |sdf| = box / 2), iso-lines every box / 20 and
    the zero contour in black.

    Returns:
        (resolution, resolution, 3) uint8 array, first image axis the plane's second axis.
    """
    lin = torch.linspace(-box, box, resolution, device=device)
    a, b = torch.meshgrid(lin, lin, indexing="xy")
    q = torch.zeros(resolution * resolution, 3, device=device)
    free = [i for i in range(3) if i != axis]
    q[:, free[0]], q[:, free[1]] = a.reshape(-1), b.flip(0).reshape(-1)
    with torch.no_grad():
        s = torch.cat([fn(c) for c in q.split(65536)]).reshape(resolution, resolution).cpu().numpy()
    t = np.clip(np.abs(s) / (box / 2), 0, 1)[..., None]
    inside, outside = np.array([40, 90, 220.0]), np.array([220, 70, 40.0])
    img = np.where(s[..., None] < 0, inside, outside) * (0.35 + 0.65 * t) + 255 * (1 - t) * 0.5
    bands = np.floor(s / (box / 20))
    iso = np.zeros_like(s, dtype=bool)
    iso[:-1] |= bands[:-1] != bands[1:]
    iso[:, :-1] |= bands[:, :-1] != bands[:, 1:]
    img[iso] *= 0.7
    zero = np.zeros_like(iso)
    zero[:-1] |= np.sign(s[:-1]) != np.sign(s[1:])
    zero[:, :-1] |= np.sign(s[:, :-1]) != np.sign(s[:, 1:])
    img[zero] = 0
    return np.clip(img, 0, 255).astype(np.uint8)
