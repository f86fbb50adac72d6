"""From a shape file to training samples.

The shape is normalised to the unit box (bounding box centred at the origin, longest side 1,
as in ``EVAL.md``) and the transform is kept so outputs return to the input's coordinates.
A dense surface sample (points + normals) is computed once; every step then draws surface,
uniform-space and near-surface samples from it on the training device with
:func:`draw_samples`, so the step has no host work and no host-device transfer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader, IterableDataset

from neusdf.mesh_io import Shape, ShapeError, load_shape

__all__ = [
    "Normalization",
    "SurfaceSamples",
    "ShapeDataModule",
    "draw_samples",
    "estimate_normals",
    "sample_triangles",
]

log = logging.getLogger(__name__)


@dataclass
class Normalization:
    """Affine map between input coordinates and the unit box: ``unit = (x - center) / scale``.

    Attributes:
        center: (3,) float64 centre of the input's bounding box.
        scale: the bounding box's longest side (> 0).
    """

    center: np.ndarray
    scale: float

    @classmethod
    def of(cls, points: np.ndarray) -> Normalization:
        """The normalisation of (N, 3) points: bbox centre to the origin, longest side to 1."""
        lo, hi = points.min(0), points.max(0)
        return cls(center=(lo + hi) / 2, scale=float((hi - lo).max()))

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) input coordinates -> unit-box coordinates."""
        return (x - self.center) / self.scale

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) unit-box coordinates -> input coordinates."""
        return x * self.scale + self.center


def sample_triangles(
    vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform samples on a triangle mesh with the sampled faces' normals.

    Args:
        vertices: (V, 3) float. faces: (F, 3) int. n: number of samples. rng: numpy generator.

    Returns:
        points (n, 3) float64 and unit face normals (n, 3) float64 (zero-area faces are never
        drawn, so every normal is defined).
    """
    tri = vertices[faces]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(cross, axis=1)
    if area2.sum() <= 0:
        raise ShapeError("mesh has zero surface area; cannot sample its surface")
    face = rng.choice(len(faces), size=n, p=area2 / area2.sum())
    # Uniform barycentrics by reflecting the unit square's upper triangle.
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[face]
    pts = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[face] / area2[face, None]
    return pts, normals


def estimate_normals(points: np.ndarray, k: int = 16) -> np.ndarray:
    """Unit normals of an unoriented point cloud by local PCA, oriented away from the centroid.

    The orientation rule is right for star-shaped surfaces only; it seeds the neural points'
    frames when a point cloud has no normals (training then has no normal loss to fix it).

    Args:
        points: (N, 3) float array with N >= 3.

    Returns:
        (N, 3) float64 unit normals.
    """
    k = min(k, len(points))
    _, nn = cKDTree(points).query(points, k=k)
    nb = points[nn] - points[nn].mean(1, keepdims=True)  # (N, k, 3)
    _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", nb, nb))
    normals = vecs[:, :, 0]  # eigenvector of the smallest eigenvalue
    outward = np.einsum("ni,ni->n", normals, points - points.mean(0)) < 0
    normals[outward] *= -1
    return normals


@dataclass
class SurfaceSamples:
    """A dense surface sample in unit-box coordinates.

    Attributes:
        points: (M, 3) float32 tensor. normals: (M, 3) float32 unit normals or None.
        spacing: mean distance between a sample and its nearest neighbour (unit box).
    """

    points: torch.Tensor
    normals: torch.Tensor | None
    spacing: float


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
    dist, _ = cKDTree(pts).query(pts[: min(len(pts), 20000)], k=2)
    samples = SurfaceSamples(
        points=torch.as_tensor(pts, dtype=torch.float32),
        normals=None if nrm is None else torch.as_tensor(nrm, dtype=torch.float32),
        spacing=float(dist[:, 1].mean()),
    )
    return samples, norm


def draw_samples(
    points: torch.Tensor,
    normals: torch.Tensor | None,
    num_surface: int,
    num_space: int,
    num_near: int,
    near_sigmas: tuple[float, ...],
    box: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor | None]:
    """One step's samples, drawn on ``points.device`` with ``generator`` (no host sync).

    Args:
        points: (M, 3) dense surface sample (unit box). normals: (M, 3) or None.
        num_surface / num_space / num_near: how many surface, uniform and near-surface samples.
        near_sigmas: std devs of the isotropic jitter of near-surface samples (equal slices).
        box: half-size of the sampling cube [-box, box]^3.
        generator: a torch.Generator on points.device (one per rank: ranks draw differently).

    Returns:
        dict with ``surface`` (Ns, 3), ``surface_normals`` (Ns, 3) or None, ``space`` (Nu, 3),
        ``near`` (Nn, 3) and ``near_offset`` (Nn,) the jitter's component along the source
        point's normal (a first-order signed distance) or None without normals.
    """
    dev, M = points.device, points.shape[0]
    i_s = torch.randint(M, (num_surface,), device=dev, generator=generator)
    i_n = torch.randint(M, (num_near,), device=dev, generator=generator)
    jitter = torch.randn(num_near, 3, device=dev, generator=generator)
    # Scale equal slices by Python floats: building a tensor of the sigmas would copy from the
    # host at every step.
    for part, sigma in zip(jitter.chunk(len(near_sigmas)), near_sigmas, strict=False):
        part.mul_(sigma)
    space = (torch.rand(num_space, 3, device=dev, generator=generator) * 2 - 1) * box
    out: dict[str, torch.Tensor | None] = {
        "surface": points[i_s],
        "surface_normals": None if normals is None else normals[i_s],
        "space": space,
        "near": points[i_n] + jitter,
        "near_offset": None if normals is None else (jitter * normals[i_n]).sum(-1),
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
        use_normals: use the file's normals when it has them (false: train as if it had none).
        num_surface / num_space / num_near: samples per step (see :func:`draw_samples`).
        near_sigmas: jitter std devs of near-surface samples. box: half-size of the domain.
    """

    def __init__(
        self,
        path: str,
        surface_samples: int = 500_000,
        seed: int = 0,
        use_normals: bool = True,
        num_surface: int = 16384,
        num_space: int = 4096,
        num_near: int = 12288,
        near_sigmas: tuple[float, ...] = (0.01, 0.002),
        box: float = 0.55,
    ) -> None:
        super().__init__()
        for name in ("surface_samples", "num_surface", "num_space", "num_near"):
            if locals()[name] < 1:
                raise ValueError(f"data.{name} must be >= 1, got {locals()[name]}")
        if box <= 0.5:
            raise ValueError(f"data.box must exceed 0.5 (the shape fills [-0.5, 0.5]^3), got {box}")
        if not near_sigmas or min(near_sigmas) <= 0:
            raise ValueError(f"data.near_sigmas must be positive numbers, got {near_sigmas}")
        self.path = path
        self.surface_samples = surface_samples
        self.seed = seed
        self.use_normals = use_normals
        self.sampling = {
            "surface": num_surface,
            "space": num_space,
            "near": num_near,
            "near_sigmas": [float(x) for x in near_sigmas],
            "box": float(box),
        }
        self.shape: Shape | None = None
        self.surface: SurfaceSamples | None = None
        self.normalization: Normalization | None = None

    def load(self) -> None:
        """Reads and samples the shape once (idempotent); raises ShapeError on bad input."""
        if self.surface is not None:
            return
        self.shape = load_shape(self.path)
        self.surface, self.normalization = prepare_surface(
            self.shape, self.surface_samples, self.seed
        )
        if not self.use_normals:
            self.surface.normals = None
        if self.surface.normals is None:
            log.warning(
                "%s has no normals: training without the normal loss and the near-surface "
                "offset loss; neural point frames start from PCA normals oriented away from "
                "the centroid",
                self.path,
            )

    @property
    def has_normals(self) -> bool:
        """Whether training samples carry normals (after :meth:`load`)."""
        return self.surface is not None and self.surface.normals is not None

    def setup(self, stage: str | None = None) -> None:
        """Lightning hook: loads the shape."""
        self.load()

    def train_dataloader(self) -> DataLoader:
        """Endless step counter (batch_size=None: one int per step)."""
        return DataLoader(_Steps(), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """A single item: validation extracts and scores one mesh."""
        return DataLoader([0], batch_size=None)
