"""A generated thin-part shape for the far-field tests: a body on four thin legs, with a neck
and a head (a union of axis-aligned boxes), sampled with exact normals.

Sparse samples of it reproduce the failure the winding-number far field exists for: the
tangent planes of the nearest points disagree between the legs and beyond their ends.
"""

from __future__ import annotations

import numpy as np

# (centre, half-size) of each box: body, four legs 0.05 thick, neck, head
BOXES = (
    ((0.0, 0.0, 0.1), (0.35, 0.12, 0.08)),
    ((-0.28, -0.08, -0.2), (0.025, 0.025, 0.22)),
    ((-0.28, 0.08, -0.2), (0.025, 0.025, 0.22)),
    ((0.28, -0.08, -0.2), (0.025, 0.025, 0.22)),
    ((0.28, 0.08, -0.2), (0.025, 0.025, 0.22)),
    ((0.40, 0.0, 0.25), (0.03, 0.03, 0.15)),
    ((0.45, 0.0, 0.40), (0.08, 0.04, 0.04)),
)


def box_sdf(x: np.ndarray, centre, half) -> np.ndarray:
    """Exact signed distance (N,) of (N, 3) points to one box."""
    q = np.abs(x - np.asarray(centre)) - np.asarray(half)
    return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)


def union_sdf(x: np.ndarray) -> np.ndarray:
    """Signed distance (N,) of the union (exact outside, a bound inside)."""
    return np.min([box_sdf(x, c, h) for c, h in BOXES], axis=0)


def sample_animal(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points uniformly on the union's surface with their outward normals, (n, 3) each."""
    rng = np.random.default_rng(seed)
    pts, nrm = [], []
    areas = [8 * (h[0] * h[1] + h[1] * h[2] + h[0] * h[2]) for _, h in BOXES]
    for (centre, half), area in zip(BOXES, areas, strict=True):
        h = np.asarray(half)
        face_area = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]]).repeat(2)
        # 3x what the box's share of the area asks for: parts inside other boxes are dropped
        m = int(3 * n * area / sum(areas)) + 1
        face = rng.choice(6, m, p=face_area / face_area.sum())
        axis, side = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
        u = rng.uniform(-1, 1, (m, 3)) * h
        u[np.arange(m), axis] = side * h[axis]
        normal = np.zeros((m, 3))
        normal[np.arange(m), axis] = side
        pts.append(np.asarray(centre) + u)
        nrm.append(normal)
    pts, nrm = np.concatenate(pts), np.concatenate(nrm)
    inside_other = np.stack([box_sdf(pts, c, h) for c, h in BOXES], 1).min(1) < -1e-9
    pts, nrm = pts[~inside_other], nrm[~inside_other]
    sel = rng.choice(len(pts), n, replace=False)
    return pts[sel], nrm[sel]
