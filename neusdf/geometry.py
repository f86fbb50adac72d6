"""Geometry shared by training, extraction and scoring: the unit-box normalisation, area-weighted
surface sampling and point-cloud normals.

The unit box: the input's bounding box centred at the origin with its longest side 1. Training,
extraction and the metrics all work in it, and outputs return to the input's coordinates
through the same :class:`Normalization`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from neusdf.mesh_io import ShapeError

__all__ = ["Normalization", "estimate_normals", "sample_triangles"]


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
