"""Generalised winding number of an oriented point cloud: a robust inside/outside indicator.

For points p_i with unit normals n_i and surface areas a_i, the winding number at q is

    w(q) = sum_i a_i n_i . (p_i - q) / (4 pi |p_i - q|^3)

(Jacobson et al. 2013, Barill et al. 2018): about 1 inside a closed surface, 0 outside and 1/2
on it. Far from the points it is a sum of many smooth terms, so a wrong normal here and there or
a thin part does not flip it; that is what the tangent planes of the nearest points cannot
offer (they disagree between limbs, beyond tips and under overhangs). The SDF uses it for the
sign far from the data (:class:`neusdf.model.NeuralPointSDF`), on a grid sampled trilinearly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from neusdf.geometry import host_threads

__all__ = ["cavity_parts", "point_areas", "winding_number", "winding_grid", "sample_grid"]

# Elements of the (queries x points) block evaluated at once: bounds the memory at ~64 MiB.
_BLOCK_ELEMENTS = 1 << 24


def point_areas(points: np.ndarray, k: int = 8, neighbours: np.ndarray | None = None) -> np.ndarray:
    """Surface area each point stands for: pi r_k^2 / k, r_k the distance to its k-th neighbour.

    For points spread over a surface with density rho (points per area), the disc of radius
    r_k holds about k points, so pi r_k^2 / k ~ 1 / rho.

    Args:
        points: (N, 3) float array, N >= 2.
        k: neighbours (capped at N - 1).
        neighbours: (N, m) int kNN indices in order of distance, column 0 the point itself,
            when the caller has them: with m > k no k-d tree is built.

    Returns:
        (N,) float64 areas.
    """
    k = max(1, min(k, len(points) - 1))
    if neighbours is not None and neighbours.shape[1] > k:
        r_k = np.linalg.norm(points[neighbours[:, k]] - points, axis=1)
    else:
        r_k = cKDTree(points).query(points, k=k + 1, workers=host_threads())[0][:, -1]
    return math.pi * r_k**2 / k


def cavity_parts(
    points: np.ndarray,
    normals: np.ndarray,
    part: np.ndarray,
    probes: int = 16,
    min_points: int = 32,
    max_parts: int = 64,
    areas: np.ndarray | None = None,
) -> np.ndarray:
    """The parts of an oriented point cloud that bound a cavity, whose normals must turn inward.

    Each part (a connected piece, its normals consistent and facing outward on their own) is
    judged by the winding number of all the other parts at its points: about 0 outside every
    other part, 1 inside one closed part, 2 inside two. An odd count means the part is the wall
    of a hole in the material (the inner wall of a hollow shell), so its material lies outside
    it. A count more than 1/4 from an integer (a piece lying on another part's surface, where
    that part's winding is about 1/2; or open parts) decides nothing: the part keeps its
    orientation.

    Args:
        points, normals: (N, 3) float arrays, the normals unit and outward per part.
        part: (N,) int part labels 0 .. n_parts - 1.
        probes: points of a part at which the others' winding number is taken (its median).
        min_points, max_parts: only parts of at least ``min_points`` points are judged, at most
            the ``max_parts`` largest (a noisy scan's specks keep their orientation).
        areas: (N,) :func:`point_areas` of the points if the caller has them (else computed).

    Returns:
        (n_parts,) bool: True for the parts to flip.
    """
    n_parts = int(part.max()) + 1
    sizes = np.bincount(part, minlength=n_parts)
    order = np.argsort(-sizes, kind="stable")[:max_parts]
    judged = [int(c) for c in order if sizes[c] >= min_points]
    flip = np.zeros(n_parts, dtype=bool)
    if n_parts < 2 or not judged:
        return flip
    pts = torch.as_tensor(points, dtype=torch.float64)
    nrm = torch.as_tensor(normals, dtype=torch.float64)
    if areas is None:
        areas = point_areas(points)
    areas = torch.as_tensor(areas, dtype=torch.float64)
    members = [np.flatnonzero(part == c) for c in judged]
    picks = [m[np.linspace(0, len(m) - 1, min(probes, len(m))).astype(np.int64)] for m in members]
    # every part's winding at every probe, then minus the probed part's own (a point's term at
    # itself is 0 in both sums)
    probe_pts = pts[np.concatenate(picks)]
    total = winding_number(probe_pts, pts, nrm, areas).split([len(p) for p in picks])
    for c, m, pick, w_all in zip(judged, members, picks, total, strict=True):
        own = winding_number(pts[pick], pts[m], nrm[m], areas[m])
        count = float((w_all - own).median())
        depth = round(count)
        flip[c] = abs(count - depth) < 0.25 and depth % 2 == 1
    return flip


def winding_number(
    queries: torch.Tensor, points: torch.Tensor, normals: torch.Tensor, areas: torch.Tensor
) -> torch.Tensor:
    """Winding number of the oriented points at each query, by direct summation.

    Args:
        queries: (Q, 3) float tensor. points, normals: (N, 3) on the same device and dtype.
        areas: (N,) areas of the points.

    Returns:
        (Q,) winding numbers (dtype of ``queries``); not differentiable (a sign label, computed
        in place).
    """
    an = normals * (areas / (4 * math.pi))[:, None]
    c = (points * an).sum(-1)  # p_i . a_i n_i
    p2 = (points * points).sum(-1)
    chunk = max(1, _BLOCK_ELEMENTS // max(len(points), 1))
    out = []
    blocks: list[torch.Tensor] = []
    for q in queries.split(chunk):
        if not blocks:
            blocks = [queries.new_empty(len(q), len(points)) for _ in range(3)]
        r2, w, tmp = (b[: len(q)] for b in blocks)
        # |q - p|^2 and (p - q) . a n through matrix products: the pairwise work is one
        # elementwise pass over a (chunk, N) block, with no (chunk, N, 3) temporaries. The
        # three blocks are written in place, chunk after chunk: on the CPU a fresh 64 MiB
        # temporary per operation is a fresh mapping whose pages fault in one by one (4x the
        # time at the CPU default's 48^3 nodes). The same operations in the same order as
        # ((qq + pp - 2 q @ p.T).clamp_min(1e-12), then (c - q @ an.T) * r2.rsqrt() / r2):
        # bit-identical values.
        torch.add((q * q).sum(-1, keepdim=True), p2, out=r2)
        torch.matmul(2 * q, points.T, out=tmp)
        r2.sub_(tmp).clamp_min_(1e-12)
        torch.matmul(q, an.T, out=w)
        torch.sub(c, w, out=w)
        w.mul_(torch.rsqrt(r2, out=tmp)).div_(r2)
        out.append(w.sum(-1))
    return torch.cat(out) if out else queries.new_zeros(0)


def winding_grid(
    points: torch.Tensor, normals: torch.Tensor, areas: torch.Tensor, resolution: int, box: float
) -> torch.Tensor:
    """The winding number at the nodes of a ``resolution``^3 grid spanning [-box, box]^3.

    Returns:
        (resolution, resolution, resolution) tensor indexed [ix, iy, iz] (x first).
    """
    lin = torch.linspace(-box, box, resolution, device=points.device, dtype=points.dtype)
    nodes = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)
    return winding_number(nodes, points, normals, areas).reshape((resolution,) * 3)


def sample_grid(grid: torch.Tensor, q: torch.Tensor, box: float) -> torch.Tensor:
    """Trilinear interpolation of a :func:`winding_grid` at (Q, 3) queries (clamped to the box).

    Returns:
        (Q,) values; not differentiable w.r.t. ``q`` (callers use it as a sign label).
    """
    # grid_sample reads its last coordinate as the first grid axis: pass (z, y, x).
    coords = (q.detach() / box).flip(-1).reshape(1, 1, 1, -1, 3).to(grid.dtype)
    v = F.grid_sample(grid[None, None], coords, align_corners=True, padding_mode="border")
    return v.reshape(-1)
