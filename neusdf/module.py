"""Lightning module: samples on the device, losses, optimiser, validation with mesh metrics.

Checkpoints are written so that :func:`neusdf.checkpoint.load_checkpoint` rebuilds the SDF
without the training data (see :mod:`neusdf.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import lightning as L
import numpy as np
import torch

from neusdf.checkpoint import META_KEY, check_compatible
from neusdf.data import SamplingConfig, SurfaceSamples, draw_samples
from neusdf.geometry import Normalization
from neusdf.losses import LossConfig, sdf_and_gradient, sdf_losses
from neusdf.meshing import extract_mesh, trim_of
from neusdf.metrics import SurfaceSet, compute_metrics
from neusdf.model import NeuralPointSDF
from neusdf.step_graph import GraphedStep, graph_support

__all__ = ["SDFModule", "VAL_METRIC_KEYS", "VAL_KEYS", "section_image"]

log = logging.getLogger(__name__)

# Mesh metrics logged at validation (``val/<key>``); the first is the progress bar's.
VAL_METRIC_KEYS = ("chamfer_l1", "normal_consistency", "fscore_0.005", "fscore_0.01", "hausdorff")
# Everything validation logs: the mesh metrics, then the Eikonal residual.
VAL_KEYS = (*VAL_METRIC_KEYS, "eikonal_residual")
# Seed of validation's uniform samples: the residual is measured at the same points every time.
_VALIDATION_SEED = 12345
# Validation measures the Eikonal residual at num_query / this many uniform samples.
_EIKONAL_QUERY_DIVISOR = 4
# Queries per SDF call when drawing a cross-section.
_SECTION_CHUNK = 65_536


class SDFModule(L.LightningModule):
    """Trains a :class:`neusdf.model.NeuralPointSDF` on one shape.

    Args:
        net: the SDF network (neural points already initialised from the shape).
        model: the model config it was built from (stored to rebuild it from a checkpoint).
        loss: loss weights (``surface``, ``normal``, ``eikonal``, ``offsurface``, ``near``) and
            ``offsurface_alpha``.
        optim: ``lr`` (decoder), ``lr_points``, ``lr_features``, ``lr_gaussians``,
            ``warmup_steps``, ``final_lr_ratio`` (cosine decay to lr * ratio at max_steps).
        sampling: what a step draws (stored in the checkpoint as a dict).
        validation: ``resolution`` (coarse mesh), ``num_query`` / ``num_ref`` metric samples,
            ``section_resolution`` (image), ``log_mesh``.
        center / scale: the data normalisation (unit = (x - center) / scale).
        seed: base seed of the per-rank sample generator (rank r uses seed + r).
        cuda_graph: on CUDA devices, replay the step as a CUDA graph after a few eager steps
            (:mod:`neusdf.step_graph`), on each rank under DDP; the CPU runs eagerly.
    """

    def __init__(
        self,
        net: NeuralPointSDF,
        model: dict,
        loss: dict,
        optim: dict,
        sampling: SamplingConfig,
        validation: dict,
        center: tuple[float, float, float] = (0.0, 0.0, 0.0),
        scale: float = 1.0,
        seed: int = 0,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "model": model,
                "loss": loss,
                "optim": optim,
                "sampling": {**asdict(sampling), "near_sigmas": list(sampling.near_sigmas)},
                "validation": validation,
                "center": center,
                "scale": scale,
                "seed": seed,
            }
        )
        self.net = net
        self.sampling = sampling
        self.losses = LossConfig.from_dict(loss)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self._generator: torch.Generator | None = None
        self.surface: SurfaceSamples | None = None
        self.cuda_graph = cuda_graph
        self.automatic_optimization = False  # see training_step
        self._graphed: GraphedStep | None = None
        self._names: list[str] | None = None
        # perf_counter at the training loop's start (None before it)
        self.loop_started_at: float | None = None
        # perf_counter when Lightning called ``setup``: after the process group exists (under
        # DDP: every rank connected, NCCL's communicator created), before the device move
        self.setup_at: float | None = None
        # wall seconds of the training loop (first step to the end of the last, every rank
        # started): the speed of training itself, without start-up or DDP process launch
        self.loop_seconds = float("nan")

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
    def setup(self, stage: str) -> None:
        """Records when Lightning's set-up reached the module (see ``setup_at``)."""
        self.setup_at = time.perf_counter()

    def on_fit_start(self) -> None:
        """Creates this rank's sample generator on the training device."""
        if self.surface is None:
            raise RuntimeError("SDFModule.set_surface must be called before fitting")
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(self.hparams.seed) + self.global_rank)
        self._graphed = None
        if self.cuda_graph and self.device.type == "cuda":
            reason = graph_support()
            if reason is None:
                self._graphed = GraphedStep(
                    self._loss_and_backward, self.parameters(), [self._generator]
                )
            else:
                log.info("training step not captured in a CUDA graph: %s", reason)

    def on_train_start(self) -> None:
        """Starts the training-loop clock (see ``loop_seconds``)."""
        self.loop_started_at = time.perf_counter()

    def on_train_end(self) -> None:
        """Stops the training-loop clock once the device has finished the queued steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.loop_started_at is not None:
            self.loop_seconds = time.perf_counter() - self.loop_started_at

    def _loss_terms(self) -> dict[str, torch.Tensor]:
        """Draws a step's samples and returns the loss terms (``loss``: the weighted total)."""
        s = self.sampling
        b = draw_samples(self.bank_points, self.bank_normals, s, self._generator)
        q = torch.cat([b["surface"], b["near"], b["space"]])
        sdf, grad = sdf_and_gradient(self.net, q)
        sizes = [s.surface, s.near, s.space]
        names = ("surface", "near", "space")
        sdfs = dict(zip(names, sdf.split(sizes), strict=True))
        grads = dict(zip(names, grad.split(sizes), strict=True))
        far_sign = getattr(self.net, "far_sign", None)  # models without a far field: no labels
        return sdf_losses(
            sdfs,
            grads,
            b["surface_normals"],
            b["near_offset"],
            self.losses.weights,
            self.losses.offsurface_alpha,
            space_sign=None if far_sign is None else far_sign(b["space"]),
        )

    def _loss_and_backward(self) -> dict[str, torch.Tensor]:
        """The captured part of a step: loss terms and the gradients of their total."""
        terms = self._loss_terms()
        terms["loss"].backward()
        return {"values": self._stack_terms(terms)}

    def _stack_terms(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The terms' values in one tensor; remembers their names (the same every step: in a
        graph, Python runs at the capture, not at the replays)."""
        self._names = list(terms)
        return torch.stack([v.detach() for v in terms.values()])

    def training_step(self, batch, batch_idx: int) -> None:
        """One optimiser step on freshly drawn samples; logs ``train/loss`` and
        ``train/loss_<term>`` every ``trainer.log_every_n_steps`` steps and at the last.

        Optimisation is manual so that the sampling, forward and backward can be one CUDA
        graph (:class:`neusdf.step_graph.GraphedStep`); the gradient all-reduce (several
        ranks), the optimiser and the learning-rate schedule step eagerly after it. The step
        calls ``backward`` itself, graphed or eager alike (float32 only, see
        :func:`neusdf.pipeline.check_config`), so Lightning's ``on_before_backward`` and
        ``on_after_backward`` hooks do not run.
        """
        opt = self.optimizers()
        if self._graphed is not None:
            values = self._graphed()["values"]
        else:
            opt.zero_grad(set_to_none=True)
            values = self._loss_and_backward()["values"]
        if self.trainer.world_size > 1:
            self._average_gradients()
        opt.step()
        self.lr_schedulers().step()
        # Lightning writes step metrics every log_every_n_steps steps; handing it the values at
        # the other steps would only cost host time (about a millisecond per step, more than
        # the GPU needs for the whole step with the graph).
        step, every = self.global_step, max(int(self.trainer.log_every_n_steps), 1)
        if step % every and step < (self.trainer.max_steps or 0):
            return
        names = self._names
        # One copy to the host here, every log_every_n_steps steps. Logged as GPU tensors, the
        # values would stay in Lightning's results, which reads the progress bar's "loss"
        # with .item() after every step (logged or not): a host synchronisation per step,
        # which kept the host from queueing the next step while the GPU ran this one
        # (benchmarks/RESULTS.md, tenth session).
        host = values.cpu()
        logs = {f"train/loss_{k}": host[i] for i, k in enumerate(names) if k != "loss"}
        logs["train/loss"] = host[names.index("loss")]
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
        self.log("loss", logs["train/loss"], prog_bar=True, logger=False, batch_size=1)

    def _average_gradients(self) -> None:
        """Averages the gradients over the ranks: one all-reduce of one flat buffer.

        Under DDP the backward runs outside DDP's reducer (a replayed graph fires no autograd
        hooks, so the reducer could not see it; the eager steps take the same path so that
        both reduce alike, and so that the CPU tests cover it). The gradients are about 700k
        floats with the default sizes: one collective instead of one per parameter.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        for g, v in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(v.view_as(g))

    def configure_optimizers(self):
        """Adam with per-group learning rates; linear warmup then cosine decay per step."""
        o = self.hparams.optim
        groups = self.net.param_groups(o)
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
        values = torch.full((len(VAL_KEYS),), float("nan"), device=self.device)
        if self.global_rank == 0:
            gen = torch.Generator(device=self.device).manual_seed(_VALIDATION_SEED)
            box = self.sampling.box
            n = v["num_query"] // _EIKONAL_QUERY_DIVISOR
            q = torch.rand(n, 3, device=self.device, generator=gen) * 2 - 1
            _, grad = sdf_and_gradient(self.net, q * box, create_graph=False)
            values[-1] = (grad.norm(dim=-1) - 1).abs().mean()
            try:
                verts, faces, _ = extract_mesh(
                    self.net,
                    v["resolution"],
                    box,
                    self.device,
                    progress=False,
                    trim=trim_of(self.net),
                )
                gt = SurfaceSet(
                    self.bank_points.cpu().numpy(),
                    normals=None if self.bank_normals is None else self.bank_normals.cpu().numpy(),
                )
                m = compute_metrics(SurfaceSet(verts, faces), gt, v["num_query"], v["num_ref"])
                metric_values = [m[k] for k in VAL_METRIC_KEYS]
                values[: len(VAL_METRIC_KEYS)] = torch.tensor(metric_values, device=self.device)
                self._log_visuals(verts, faces)
            except ValueError as e:  # no surface yet: log NaN metrics, keep training
                log.warning("validation at step %d: %s", self.global_step, e)
        values = self.trainer.strategy.broadcast(values, src=0)
        for k, x in zip(VAL_KEYS, values, strict=True):
            self.log(
                f"val/{k}",
                x,
                on_epoch=True,
                sync_dist=False,
                prog_bar=k == VAL_METRIC_KEYS[0],
                batch_size=1,
            )

    def _log_visuals(self, verts: np.ndarray, faces: np.ndarray) -> None:
        """Cross-section image and mesh to TensorBoard (skipped for other loggers)."""
        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image"):
            return
        v = self.hparams.validation
        img = section_image(self.net, v["section_resolution"], self.sampling.box, self.device)
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
        checkpoint[META_KEY] = {"num_points": self.net.num_points}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuses checkpoints of another model configuration with a readable message."""
        check_compatible(checkpoint, dict(self.hparams.model), self.net.num_points)


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
        s = torch.cat([fn(c) for c in q.split(_SECTION_CHUNK)])
    s = s.reshape(resolution, resolution).cpu().numpy()
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
