"""Metrics on analytic shapes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from neusdf import metrics
from neusdf.geometry import sample_triangles
from neusdf.metrics import METRIC_KEYS, SurfaceSet, compute_metrics, evaluate, format_table


def sphere_points(radius: float, n: int, seed: int, center=(0.0, 0.0, 0.0)) -> SurfaceSet:
    """n uniform points on a sphere with exact (radial) normals."""
    d = np.random.default_rng(seed).normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return SurfaceSet(np.asarray(center) + radius * d, normals=d)


@pytest.mark.parametrize("gap", [0.003, 0.02])
def test_concentric_spheres(gap):
    # Every point of one sphere is exactly `gap` from the other sphere, in both directions,
    # so accuracy = completeness = Chamfer = Hausdorff = gap up to the sampling floor below.
    r_in, r_out, n_ref, n_q = 0.4, 0.4 + gap, 300_000, 20_000
    m = compute_metrics(
        sphere_points(r_out, n_ref, 2), sphere_points(r_in, n_ref, 1), num_query=n_q, num_ref=n_ref
    )
    assert set(METRIC_KEYS) <= set(m)
    # Sampling floor. A query at angle theta from its nearest reference sample (density rho
    # per unit area on the reference sphere) is at distance^2 = gap^2 + r_in r_out theta^2.
    # Uniform samples leave the tangential offset t = (reference radius) theta with
    # P(t > x) = exp(-pi rho x^2), so distance^2 = gap^2 + c t^2 with c = r_out / r_in
    # (accuracy: reference on the inner sphere) or r_in / r_out (completeness).
    rho_in = n_ref / (4 * math.pi * r_in**2)
    rho_out = n_ref / (4 * math.pi * r_out**2)
    floors = {"accuracy": (rho_in, r_out / r_in), "completeness": (rho_out, r_in / r_out)}
    for k, (rho, c) in floors.items():
        # E[distance] <= gap + c E[t^2] / (2 gap) = gap + c / (2 pi rho gap); 4 std of the mean
        excess = c / (2 * math.pi * rho * gap)
        assert gap <= m[k] <= gap + excess * (1 + 4 / math.sqrt(n_q)), k
    assert m["chamfer_l1"] == pytest.approx((m["accuracy"] + m["completeness"]) / 2)
    # the largest of 2 n_q offsets: pi rho x^2 = ln(2 n_q) + 7 is exceeded with prob. < 1e-3
    x2 = (math.log(2 * n_q) + 7) / (math.pi * rho_out)
    assert gap <= m["hausdorff"] <= math.sqrt(gap**2 + x2 * r_out / r_in)
    assert m["normal_consistency"] == pytest.approx(1.0, abs=1e-3)
    for tau in (0.005, 0.01):
        # P(distance < tau) = 1 - exp(-pi rho (tau^2 - gap^2) / c) per direction
        pr = [
            1 - math.exp(-math.pi * rho * (tau**2 - gap**2) / c) if tau > gap else 0.0
            for rho, c in floors.values()
        ]
        f = 2 * pr[0] * pr[1] / (pr[0] + pr[1]) if sum(pr) > 0 else 0.0
        tol = 4 * math.sqrt(max(f * (1 - f), 1e-12) / n_q) + 1e-4
        assert m[f"fscore_{tau:g}"] == pytest.approx(f, abs=tol)


def test_partial_fscore_and_asymmetry():
    # A hemisphere against the full sphere: recon -> GT is exact (precision 1), but GT points
    # below the rim are missing: those within tau of the rim (a zone of height ~tau, area
    # fraction tau / 2r) still count, so recall = 1/2 + tau / 2r and F = 2R / (1 + R).
    full = sphere_points(0.4, 400_000, 3)
    half_pts = full.points[full.points[:, 2] > 0]
    half = SurfaceSet(half_pts, normals=full.normals[full.points[:, 2] > 0])
    m = compute_metrics(half, sphere_points(0.4, 400_000, 4), num_query=40_000, num_ref=400_000)
    assert m["accuracy"] < 0.002
    assert m["completeness"] > 0.05
    for tau in (0.005, 0.01):
        recall = 0.5 + tau / (2 * 0.4)
        assert m[f"fscore_{tau:g}"] == pytest.approx(2 * recall / (1 + recall), abs=0.003)
    assert m["hausdorff"] == pytest.approx(0.4 * math.sqrt(2), abs=0.01)


def test_meshes_are_sampled_and_normalised_by_the_reference():
    # The same pair of spheres, scaled by 10 and moved: evaluate() normalises by the
    # reference's bounding box (longest side 1), so the numbers are those of radii 0.5 / 0.52
    a = trimesh.creation.icosphere(subdivisions=5, radius=5.0)
    b = trimesh.creation.icosphere(subdivisions=5, radius=5.2)
    for m_ in (a, b):
        m_.apply_translation([100.0, -3.0, 7.0])
    m = evaluate(
        SurfaceSet.from_mesh(b), SurfaceSet.from_mesh(a), num_query=20_000, num_ref=200_000
    )
    assert m["chamfer_l1"] == pytest.approx(0.02, rel=0.05)
    assert m["normal_consistency"] > 0.99


def test_identical_shapes_and_missing_normals():
    s = sphere_points(0.4, 100_000, 5)
    m = compute_metrics(s, s, num_query=10_000, num_ref=100_000)
    assert m["chamfer_l1"] == 0.0 and m["fscore_0.005"] == 1.0
    m = compute_metrics(SurfaceSet(s.points), s, num_query=10_000, num_ref=100_000)
    assert math.isnan(m["normal_consistency"])


def test_format_table_lists_every_metric():
    table = format_table({"a": {"chamfer_l1": 0.5, "hausdorff": 1.0}})
    assert "chamfer_l1" in table and "| a | 0.5 | 1 |" in table


def _sample_triangles_plain(vertices, faces, n, rng):
    """The textbook form of sample_triangles (whole triangles indexed per sample)."""
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(cross, axis=1)
    face = rng.choice(len(faces), size=n, p=area2 / area2.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[face]
    pts = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    return pts, cross[face] / area2[face, None]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_triangle_samples_are_those_of_the_plain_formula(dtype):
    # The gathered per-face form must draw bit-identical samples for the same generator (the
    # metrics' numbers must not move with it), in the vertices' precision, a degenerate face
    # included (never drawn).
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    verts = np.asarray(mesh.vertices, dtype=dtype)
    faces = np.vstack([mesh.faces, [[0, 0, 1]]])
    got = sample_triangles(verts, faces, 50_000, np.random.default_rng(7))
    want = _sample_triangles_plain(verts, faces, 50_000, np.random.default_rng(7))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and np.array_equal(g, w)


def test_the_fast_tree_of_mesh_samples_changes_no_number(monkeypatch):
    # Mesh samples are matched in a tree built without median splits or node shrinking; the
    # nearest neighbours, hence every metric, must equal those of scipy's default tree.
    a = SurfaceSet.from_mesh(trimesh.creation.icosphere(subdivisions=4, radius=0.4))
    b = SurfaceSet.from_mesh(trimesh.creation.torus(0.3, 0.1))
    fast = compute_metrics(a, b, num_query=20_000, num_ref=200_000)
    monkeypatch.setattr(metrics, "_tree", lambda ref, sampled: metrics.cKDTree(ref))
    assert compute_metrics(a, b, num_query=20_000, num_ref=200_000) == fast
