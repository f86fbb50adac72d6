"""From a shape file to training samples.

The shape is normalised to the unit box (bounding box centred at the origin, longest side 1,
the frame the metrics use too) and the transform is kept so outputs return to the input's
coordinates.
A dense surface sample (points + normals) is computed once; every step then draws surface,
uniform-space and near-surface samples from it on the training device with
:func:`draw_samples`, so the step has no host work and no host-device transfer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from neusdf.adapt import AUTO, normal_neighbours
from neusdf.geometry import (
    InputStats,
    Normalization,
    estimate_normals,
    measure_points,
    sample_triangles,
)
from neusdf.mesh_io import Shape, ShapeError, load_shape

__all__ = [
    "SamplingConfig",
    "SurfaceSamples",
    "ShapeDataModule",
    "draw_samples",
    "prepare_surface",
]

log = logging.getLogger(__name__)

# Fewest surface points accepted: a point's normal is estimated from its 16 nearest.
MIN_SURFACE_POINTS = 16


@dataclass
class SurfaceSamples:
    """A dense surface sample in unit-box coordinates.

    Attributes:
        points: (M, 3) float32 tensor. normals: (M, 3) float32 unit normals or None.
    """

    points: torch.Tensor
    normals: torch.Tensor | None


@dataclass(frozen=True)
class SamplingConfig:
    """What one training step draws (see :func:`draw_samples`).

    Attributes:
        surface / space / near: how many surface, uniform and near-surface samples.
        near_sigmas: std devs of the near-surface samples' offsets along the normal (isotropic
            jitter without normals), in equal slices.
        box: half-size of the sampling cube [-box, box]^3 (the shape fills [-0.5, 0.5]^3).
    """

    surface: int
    space: int
    near: int
    near_sigmas: tuple[float, ...]
    box: float

    def __post_init__(self) -> None:
        for name in ("surface", "space", "near"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.num_{name} must be >= 1, got {getattr(self, name)}")
        if self.box <= 0.5:
            raise ValueError(
                f"data.box must exceed 0.5 (the shape fills [-0.5, 0.5]^3), got {self.box}"
            )
        if not self.near_sigmas or min(self.near_sigmas) <= 0:
            raise ValueError(f"data.near_sigmas must be positive numbers, got {self.near_sigmas}")
        # plain Python numbers: the step scales by them without a host-device copy
        object.__setattr__(self, "near_sigmas", tuple(float(x) for x in self.near_sigmas))
        object.__setattr__(self, "box", float(self.box))

    @property
    def total(self) -> int:
        """Samples per step."""
        return self.surface + self.space + self.near


def prepare_surface(
    shape: Shape, num_samples: int, seed: int
) -> tuple[SurfaceSamples, Normalization]:
    """Normalises a shape and draws its dense surface sample.

    Meshes are sampled (``num_samples`` points with face normals); point clouds are used as
    they are (with their normals, or None).
    """
    norm = Normalization.of(shape.points)
    if shape.is_mesh:
        rng = np.random.default_rng(seed)
        pts, nrm = sample_triangles(norm.to_unit(shape.points), shape.faces, num_samples, rng)
    else:
        pts, nrm = norm.to_unit(shape.points), shape.normals
    samples = SurfaceSamples(
        points=torch.as_tensor(pts, dtype=torch.float32),
        normals=None if nrm is None else torch.as_tensor(nrm, dtype=torch.float32),
    )
    return samples, norm


def draw_samples(
    points: torch.Tensor,
    normals: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor | None]:
    """One step's samples, drawn on ``points.device`` with ``generator`` (no host sync).

    Args:
        points: (M, 3) dense surface sample (unit box). normals: (M, 3) or None.
        sampling: how many samples of each kind, the near-surface jitter and the domain.
        generator: a torch.Generator on points.device (one per rank: ranks draw differently).

    Returns:
        dict with ``surface`` (Ns, 3), ``surface_normals`` (Ns, 3) or None, ``space`` (Nu, 3),
        ``near`` (Nn, 3) and ``near_offset`` (Nn,) the signed offset of each near-surface
        sample from its source point along that point's normal, or None without normals.
    """
    s = sampling
    dev, M = points.device, points.shape[0]
    i_s = torch.randint(M, (s.surface,), device=dev, generator=generator)
    i_n = torch.randint(M, (s.near,), device=dev, generator=generator)
    # Near-surface samples move along their source point's normal, so that the offset is their
    # signed distance wherever it stays within the local thickness, not just to first order.
    # An isotropic jitter's normal component misses the distance by about kappa |tangential
    # jitter|^2 / 2, pushing convex parts outward and concave ones inward: fitting it made a thin
    # rod (radius 0.028 of the box, the wider jitter 0.01) come out 3% too thick
    # (docs/training.md).
    # Without normals there is no target and the samples only feed the Eikonal term.
    jitter = torch.randn(s.near, 3 if normals is None else 1, device=dev, generator=generator)
    # Scale equal slices by Python floats: building a tensor of the sigmas would copy from the
    # host at every step.
    for part, sigma in zip(jitter.chunk(len(s.near_sigmas)), s.near_sigmas, strict=False):
        part.mul_(sigma)
    space = (torch.rand(s.space, 3, device=dev, generator=generator) * 2 - 1) * s.box
    out: dict[str, torch.Tensor | None] = {
        "surface": points[i_s],
        "surface_normals": None if normals is None else normals[i_s],
        "space": space,
        "near": points[i_n] + (jitter if normals is None else jitter * normals[i_n]),
        "near_offset": None if normals is None else jitter[:, 0],
    }
    return out


class _Steps(IterableDataset):
    """An endless stream of step numbers: samples are drawn on the device by the module."""

    def __iter__(self) -> Iterator[int]:
        step = 0
        while True:
            yield step
            step += 1


class ShapeDataModule(L.LightningDataModule):
    """Loads one shape and serves it to :class:`neusdf.module.SDFModule`.

    The loaders only pace the loop (a step counter and one validation item); the samples
    themselves come from :func:`draw_samples` on the training device.

    Args:
        path: shape file (mesh: obj/ply/stl/off; point cloud: ply/xyz/npz).
        surface_samples: size of the dense sample drawn once from a mesh.
        seed: seed of that sample.
        use_normals: use the file's normals when it has them (false: estimate them instead).
        normal_neighbours: points in the PCA neighbourhood of estimated normals (>= 3), or
            'auto': 16, or 64 for input measured as noisy (:func:`neusdf.adapt.normal_neighbours`).
        num_surface / num_space / num_near: samples per step (see :func:`draw_samples`).
        near_sigmas: offset std devs of near-surface samples. box: half-size of the domain.
    """

    def __init__(
        self,
        path: str,
        surface_samples: int = 500_000,
        seed: int = 0,
        use_normals: bool = True,
        normal_neighbours: int | str = AUTO,
        num_surface: int = 16384,
        num_space: int = 4096,
        num_near: int = 12288,
        near_sigmas: tuple[float, ...] = (0.01, 0.002),
        box: float = 0.55,
    ) -> None:
        super().__init__()
        if surface_samples < 1:
            raise ValueError(f"data.surface_samples must be >= 1, got {surface_samples}")
        if normal_neighbours != AUTO and (
            not isinstance(normal_neighbours, int) or normal_neighbours < 3
        ):
            raise ValueError(
                f"data.normal_neighbours must be an integer >= 3 or '{AUTO}', "
                f"got {normal_neighbours!r}"
            )
        self.normal_neighbours = normal_neighbours
        self.sampling = SamplingConfig(num_surface, num_space, num_near, tuple(near_sigmas), box)
        self.path = path
        self.surface_samples = surface_samples
        self.seed = seed
        self.use_normals = use_normals
        self.shape: Shape | None = None
        self.surface: SurfaceSamples | None = None
        self.normalization: Normalization | None = None
        self.stats: InputStats | None = None

    def load(self) -> None:
        """Reads and samples the shape once (idempotent); raises ShapeError on bad input.

        A point cloud without normals (or ``use_normals=false``) gets normals estimated and
        consistently oriented (:func:`neusdf.geometry.estimate_normals`); training then uses
        them as it would the file's. :attr:`stats` records what the input looked like.
        """
        if self.surface is not None:
            return
        self.shape = load_shape(self.path)
        self.surface, self.normalization = prepare_surface(
            self.shape, self.surface_samples, self.seed
        )
        n = len(self.surface.points)
        if n < MIN_SURFACE_POINTS:
            raise ShapeError(
                f"'{self.path}' has {n} points; at least {MIN_SURFACE_POINTS} are needed to "
                "define a surface"
            )
        had_normals = self.use_normals and self.surface.normals is not None
        self.stats = measure_points(self.surface.points.numpy(), had_normals, self.seed)
        if not had_normals:
            t0 = time.perf_counter()
            k = self.normal_neighbours
            k = normal_neighbours(self.stats) if k == AUTO else k
            normals = estimate_normals(self.surface.points.numpy().astype(np.float64), k=k)
            self.surface.normals = torch.as_tensor(normals, dtype=torch.float32)
            log.info(
                "%s: no normals used from the file; estimated and oriented %d normals "
                "(local PCA over %d points, spanning-tree propagation) in %.1f s",
                self.path,
                len(normals),
                k,
                time.perf_counter() - t0,
            )

    @property
    def has_normals(self) -> bool:
        """Whether the input's own normals are used (after :meth:`load`; else estimated)."""
        return self.stats is not None and self.stats.has_normals

    def setup(self, stage: str | None = None) -> None:
        """Lightning hook: loads the shape."""
        self.load()

    def train_dataloader(self) -> DataLoader:
        """Endless step counter (batch_size=None: one int per step)."""
        return DataLoader(_Steps(), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """A single item: validation extracts and scores one mesh."""
        return DataLoader([0], batch_size=None)
