"""Mesh extraction on analytic SDFs: accuracy, orientation, narrow band and slab stitching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from neusdf.meshing import extract_mesh, unique_rows
from neusdf.shapes import default_shape_sdf


def sphere(q: torch.Tensor) -> torch.Tensor:
    return q.norm(dim=-1) - 0.3


@pytest.mark.parametrize("resolution", [40, 57])  # 57: the last slab and block are partial
def test_sphere_is_accurate_closed_and_outward(resolution):
    v, f, stats = extract_mesh(sphere, resolution, 0.5, progress=False)
    mesh = trimesh.Trimesh(v, f, process=False)
    h = 1.0 / (resolution - 1)
    assert np.abs(np.linalg.norm(v, axis=1) - 0.3).max() < 0.1 * h
    assert mesh.is_watertight  # slabs are stitched: no cracks at their shared layers
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.02)  # > 0: outward
    # every grid point at most once, plus the coarse pass (one point per 8^3 block)
    assert stats.evaluated <= stats.total + (resolution // 8 + 1) ** 3


def test_far_blocks_are_skipped():
    _, _, stats = extract_mesh(lambda q: q.norm(dim=-1) - 0.1, 96, 0.5, progress=False)
    assert stats.evaluated < 0.2 * stats.total


def test_narrow_band_matches_full_grid():
    def fn(q):
        return torch.as_tensor(default_shape_sdf(q.double().numpy()), dtype=torch.float32)

    v1, f1, s1 = extract_mesh(fn, 64, 0.55, progress=False)
    v0, f0, s0 = extract_mesh(fn, 64, 0.55, band=0, progress=False)
    assert s0.evaluated >= 64**3 and s1.evaluated < 0.5 * s0.evaluated
    assert np.array_equal(v0, v1) and np.array_equal(f0, f1)


def test_queries_are_chunked():
    sizes = []

    def fn(q):
        sizes.append(len(q))
        return sphere(q)

    extract_mesh(fn, 48, 0.5, chunk=1000, progress=False)
    assert max(sizes) <= 1000


def test_no_surface_is_a_clear_error():
    with pytest.raises(ValueError, match="no zero crossing"):
        extract_mesh(lambda q: q.norm(dim=-1) + 1.0, 16, 0.5, progress=False)


def test_unique_rows_is_numpys_unique_of_rows():
    rng = np.random.default_rng(3)
    # many exact duplicates (shared slab layers), ties in the first columns, signed zeros
    base = rng.integers(0, 6, size=(400, 3)).astype(np.float64) + rng.choice([0.0, 0.25], (400, 3))
    a = base[rng.integers(0, len(base), size=3000)]
    a[:5] = [[-0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.25, 0.0, 0.0], [5.25, 0.0, -1.0], [0, 0, 0]]
    want, want_inverse = np.unique(a, axis=0, return_inverse=True)
    got, got_inverse = unique_rows(a)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_inverse, want_inverse.reshape(-1))
    np.testing.assert_array_equal(got[got_inverse], a)
