"""No spurious surface far from the data: the winding number, normal orientation, the far field.

The failure these tests pin down: a sparse sample of a shape with thin parts, where the tangent
planes of the nearest points disagree about the sign between the legs and beyond their ends,
so the SDF had zero crossings in empty space (mesh pieces far from every input point).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree
from shapes_thin import sample_animal, union_sdf

from neusdf import winding
from neusdf.geometry import (
    Normalization,
    estimate_normals,
    measure_points,
    orient_normals,
    pca_normals,
    sample_triangles,
)
from neusdf.meshing import Trim, extract_mesh
from neusdf.model import NeuralPointSDF, PointInit
from neusdf.winding import point_areas, sample_grid, winding_grid, winding_number


def sphere_points(n: int, radius: float = 0.4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return radius * d, d


def test_point_areas_add_up_to_the_surface_area():
    p, _ = sphere_points(4000)
    assert point_areas(p).sum() == pytest.approx(4 * np.pi * 0.4**2, rel=0.1)
    # the caller's kNN lists (column 0 the point itself) give the same areas without a tree
    _, nn = cKDTree(p).query(p, k=10)
    np.testing.assert_allclose(point_areas(p, neighbours=nn), point_areas(p), rtol=1e-12)


def test_winding_number_is_one_inside_and_zero_outside():
    p, n = sphere_points(4000)
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    q = t([[0.0, 0, 0], [0.1, 0.2, -0.1], [0.6, 0, 0], [0.3, 0.3, 0.3], [0, 0, 0.45]])
    w = winding_number(q, t(p), t(n), t(point_areas(p)))
    np.testing.assert_allclose(w.numpy(), [1, 1, 0, 0, 0], atol=0.05)
    # flipped normals flip the sign: the indicator follows the orientation
    w_flipped = winding_number(q, t(p), -t(n), t(point_areas(p)))
    np.testing.assert_allclose(w_flipped.numpy(), -w.numpy(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_winding_number_equals_the_plain_formula_bit_for_bit(dtype, monkeypatch):
    # The summation writes three reused blocks in place (a speed-up on the CPU); the values
    # must be those of the plain expression, over several chunks and a short last one.
    monkeypatch.setattr(winding, "_BLOCK_ELEMENTS", 1000 * 37)
    p, n = sphere_points(1000)
    t = lambda x: torch.as_tensor(x, dtype=dtype)  # noqa: E731
    q = t(np.random.default_rng(1).uniform(-0.6, 0.6, size=(500, 3)))
    pts, nrm, a = t(p), t(n), t(point_areas(p))
    an = nrm * (a / (4 * np.pi))[:, None]
    c, p2 = (pts * an).sum(-1), (pts * pts).sum(-1)
    want = []
    for qq in q.split(37):
        r2 = ((qq * qq).sum(-1, keepdim=True) + p2 - 2 * qq @ pts.T).clamp_min(1e-12)
        want.append(((c - qq @ an.T) * r2.rsqrt() / r2).sum(-1))
    assert torch.equal(winding_number(q, pts, nrm, a), torch.cat(want))


def test_winding_grid_sampling_matches_direct_evaluation():
    p, n = sphere_points(3000)
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    a = t(point_areas(p))
    grid = winding_grid(t(p), t(n), a, 33, 0.55)
    # at grid nodes, interpolation returns the node values (axis order included)
    lin = torch.linspace(-0.55, 0.55, 33)
    nodes = torch.stack([lin[[3, 16, 30]], lin[[20, 16, 5]], lin[[7, 16, 29]]], -1)
    direct = winding_number(nodes, t(p), t(n), a)
    torch.testing.assert_close(sample_grid(grid, nodes, 0.55), direct, atol=1e-5, rtol=1e-4)


def test_orientation_is_consistent_on_a_non_star_shaped_surface():
    """A torus: the centroid rule flips the inner side; the spanning tree does not."""
    torus = trimesh.creation.torus(0.3, 0.08, major_sections=64, minor_sections=32)
    p, n_true = sample_triangles(torus.vertices, torus.faces, 6000, np.random.default_rng(1))
    _, nn = cKDTree(p).query(p, k=16)
    unoriented = pca_normals(p, nn)
    centroid_rule = np.where(
        (np.einsum("ij,ij->i", unoriented, p - p.mean(0)) < 0)[:, None], -unoriented, unoriented
    )
    wrong = lambda n: (np.einsum("ij,ij->i", n, n_true) < 0).mean()  # noqa: E731
    assert wrong(centroid_rule) > 0.2  # the old rule fails on this shape
    assert wrong(orient_normals(p, unoriented, nn[:, :10])) < 0.001
    assert wrong(estimate_normals(p)) < 0.001


def test_normals_of_each_connected_part_point_outward():
    a, na = sphere_points(1500, radius=0.15, seed=1)
    b, nb = sphere_points(1500, radius=0.1, seed=2)
    p = np.concatenate([a - [0.25, 0, 0], b + [0.3, 0, 0]])
    n = estimate_normals(p)
    assert (np.einsum("ij,ij->i", n, np.concatenate([na, nb])) > 0.9).all()


def test_the_inner_wall_of_a_hollow_shell_faces_its_cavity():
    """Two concentric spheres (a shell) and a ball in its cavity, each a part of its own (the
    walls are farther apart than the neighbourhoods): the outward rule alone turned the inner
    wall outward, into the material."""
    outer, n_outer = sphere_points(6000, radius=0.45, seed=1)
    inner, n_inner = sphere_points(4000, radius=0.30, seed=2)
    core, n_core = sphere_points(1500, radius=0.15, seed=3)  # inside two parts: outward
    p = np.concatenate([outer, inner, core])
    truth = np.concatenate([n_outer, -n_inner, n_core])
    n = estimate_normals(p)
    agree = np.einsum("ij,ij->i", n, truth)
    assert (agree > 0.9).all(), f"{(agree < 0).mean():.2%} of the normals point the wrong way"


def test_a_wall_thinner_than_the_neighbourhoods_gets_both_sides_right():
    """A hollow sphere at 10k points, walls 0.06 apart: the kNN graph crosses the gap, and
    following those edges turned the inner wall (44% of the points) into the material."""
    outer, n_outer = sphere_points(5600, radius=0.5, seed=1)
    inner, n_inner = sphere_points(4400, radius=0.44, seed=2)
    p = np.concatenate([outer, inner])
    _, nn = cKDTree(p).query(p, k=10)
    crossing = (np.linalg.norm(p[nn], axis=-1) > 0.47) != (np.linalg.norm(p, axis=1) > 0.47)[
        :, None
    ]
    assert crossing.any()  # the case at hand: some neighbourhoods span the gap
    agree = np.einsum("ij,ij->i", estimate_normals(p), np.concatenate([n_outer, -n_inner]))
    assert (agree < 0).mean() < 0.005, f"{(agree < 0).mean():.2%} point the wrong way"


def test_two_closed_parts_joined_at_a_contact_both_face_out():
    """Two spheres a point spacing apart at 10k points: the kNN graph joins them at the
    contact, the tree copied a sign across it and turned one sphere inside out (50% wrong);
    the winding number finds the reversed subtree."""
    a, na = sphere_points(5000, radius=0.3, seed=1)
    b, nb = sphere_points(5000, radius=0.3, seed=2)
    p = np.concatenate([a - [0.31, 0, 0], b + [0.31, 0, 0]])
    _, nn = cKDTree(p).query(p, k=10)
    assert ((p[nn][..., 0] > 0) != (p[:, :1] > 0)).any()  # the case at hand: joined
    agree = np.einsum("ij,ij->i", estimate_normals(p), np.concatenate([na, nb]))
    assert (agree < 0).mean() < 0.01, f"{(agree < 0).mean():.2%} point the wrong way"


def test_a_noisy_hollow_shell_without_normals_gets_its_cavity_wall_right():
    """Walls at radii 0.45 and 0.40, 20k points with noise near the spacing, 64-point PCA:
    the orientation left the whole inner wall facing into the material (43% wrong), where the
    winding number inside the cavity is 2."""
    outer, n_outer = sphere_points(11200, radius=0.45, seed=1)
    inner, n_inner = sphere_points(8800, radius=0.40, seed=2)
    p = np.concatenate([outer, inner])
    p = p + np.random.default_rng(3).normal(scale=0.005, size=p.shape)
    agree = np.einsum("ij,ij->i", estimate_normals(p, k=64), np.concatenate([n_outer, -n_inner]))
    assert (agree < 0).mean() < 0.02, f"{(agree < 0).mean():.2%} point the wrong way"


def test_measured_noise_separates_clean_from_noisy_samples():
    p, _ = sample_animal(20000, seed=3)
    rng = np.random.default_rng(0)
    clean = measure_points(p, True)
    noisy = measure_points(p + rng.normal(scale=0.005, size=p.shape), True)
    assert clean.noise_ratio < 0.25 < 0.5 < noisy.noise_ratio
    assert clean.spacing == pytest.approx(np.sqrt(1.0 / 20000), rel=0.6)


def _far_surface(far_start: float, far_end: float) -> float:
    """Largest distance from the init SDF's zero set (untrimmed) to the sparse input."""
    p, n = sample_animal(3000, seed=0)
    pu = Normalization.of(p).to_unit(p)
    net = NeuralPointSDF(
        num_points=1024,
        init=PointInit(pu, n),
        far_start=far_start,
        far_end=far_end,
        winding_resolution=48,
        backend="reference",
    )
    verts, _, _ = extract_mesh(net, 64, 0.55, progress=False)
    return float(cKDTree(pu).query(verts)[0].max())


def test_no_zero_crossing_far_from_sparse_thin_parts():
    """With the winding-number far field, the zero set stays near the data; with the tangent
    planes alone (far field pushed out of reach) it does not: this is the failure."""
    assert _far_surface(2.0, 4.0) < 0.1
    assert _far_surface(1e3, 2e3) > 0.15


def test_far_field_sign_matches_the_shape():
    p, n = sample_animal(3000, seed=0)
    norm = Normalization.of(p)
    net = NeuralPointSDF(num_points=1024, init=PointInit(norm.to_unit(p), n), backend="reference")
    q = np.random.default_rng(1).uniform(-0.55, 0.55, size=(4000, 3))
    truth = union_sdf(norm.from_unit(q))
    far = np.abs(truth) > 0.05 * norm.scale  # well away from the surface
    with torch.no_grad():
        sdf = net(torch.as_tensor(q, dtype=torch.float32)).numpy()
    assert (np.sign(sdf[far]) == np.sign(truth[far])).mean() > 0.999


def test_extraction_trims_surface_away_from_the_points():
    """An open patch: the far field closes it across the hole; the trim removes that cap."""
    p, n = sphere_points(4000)
    cap = p[:, 2] < 0.3  # a sphere with its top cut off: open at z = 0.3
    net = NeuralPointSDF(num_points=1500, init=PointInit(p[cap], n[cap]), backend="reference")
    v_all, f_all, _ = extract_mesh(net, 64, 0.55, progress=False)
    v, f, _ = extract_mesh(net, 64, 0.55, progress=False, trim=net.surface_trim())
    d_all = cKDTree(p[cap]).query(v_all)[0]
    d, nearest = cKDTree(net.data_points.numpy()).query(v, k=16)
    assert d_all.max() > 0.1  # the cap across the hole
    # kept: each vertex within trim_reach local spacings (the median over its 16 nearest input
    # points) of its nearest input point
    reach = net.trim_reach * np.median(net.data_spacing.numpy()[nearest], axis=1)
    assert (d[:, 0] <= reach + 1e-6).all()
    # and the open rim is not inflated: nothing kept beyond the rim by more than the interior's
    # typical spacing
    assert v[:, 2].max() <= 0.3 + np.median(net.data_spacing.numpy()) + 1e-6
    assert len(f) < len(f_all) and trimesh.Trimesh(v, f).area > 0.8 * 4 * np.pi * 0.4**2 * 0.8


def _polar(x: np.ndarray) -> np.ndarray:
    return np.arccos(np.clip(x[:, 2] / np.linalg.norm(x, axis=1), -1, 1))


def test_trim_removes_the_whole_cap_across_a_narrow_hole():
    """A sparse sample with a hole about as wide as a random gap: vertex by vertex the cap's
    outer ring looks like data (within a local spacing), so a pointwise trim leaves a ring
    of cap far from the surface; the hysteresis trim removes it with the cap's centre, and
    keeps every bit of the true surface."""
    p, n = sphere_points(3000, seed=0)
    hole = 0.22  # polar angle: a hole of radius 0.088, about 1.4 local spacings
    kept = _polar(p) > hole
    net = NeuralPointSDF(num_points=1000, init=PointInit(p[kept], n[kept]), backend="compiled")
    spacing = np.median(net.data_spacing.numpy())
    dense, _ = sphere_points(400_000, seed=9)
    surface = dense[_polar(dense) > hole]  # the true (open) surface
    truth = cKDTree(surface)

    def farthest_and_gap(trim):
        v, f, _ = extract_mesh(net, 64, 0.55, progress=False, trim=trim)
        far = truth.query(v)[0].max() / spacing
        gap = cKDTree(sample_triangles(v, f, 200_000, np.random.default_rng(0))[0])
        return far, gap.query(surface[::10])[0].max() / spacing

    far_pointwise, _ = farthest_and_gap(Trim(net.data_reach, net.trim_reach, net.trim_reach))
    far, gap = farthest_and_gap(net.surface_trim())
    assert far_pointwise > 1.0  # the failure: cap left more than a spacing off the surface
    assert far < 0.85
    assert gap < 0.2  # the true surface is all there (up to the 64^3 grid)


def test_trim_keeps_the_surface_between_sparse_samples():
    """Every point of the true surface where there is data counts as near it, at any density."""
    for n_input in (800, 20000):
        p, n = sphere_points(n_input, seed=1)
        # the compiled op's grid search: the reference one is brute force
        net = NeuralPointSDF(num_points=400, init=PointInit(p, n), backend="compiled")
        truth, _ = sphere_points(200_000, seed=2)  # the surface itself, densely
        reach = net.data_reach(torch.as_tensor(truth, dtype=torch.float32))
        kept = (reach <= net.trim_reach).numpy()
        assert kept.mean() > 0.99999, (n_input, kept.mean())
        # and not much farther (the reach is about 4.8 median spacings, larger where the random
        # sample is locally sparse): 8 median spacings off the sphere, hardly anything is kept,
        # 12 off, nothing
        spacing = np.median(cKDTree(p).query(p, k=2)[0][:, 1])
        for off, most in ((8, 0.02), (12, 0.0)):
            x = torch.as_tensor(truth * (1 + off * spacing / 0.4), dtype=torch.float32)
            assert (net.data_reach(x) <= net.trim_reach).float().mean() <= most


def test_trim_sample_survives_a_rebuild_without_data():
    p, n = sphere_points(3000)
    net = NeuralPointSDF(num_points=500, init=PointInit(p, n), backend="reference")
    empty = NeuralPointSDF(num_points=500, init=None, backend="reference")
    assert empty.data_points is None
    empty.load_state_dict(net.state_dict())
    torch.testing.assert_close(empty.data_points, net.data_points)
    q = torch.rand(5000, 3) - 0.5
    assert torch.equal(empty.data_reach(q), net.data_reach(q))
    # a net built from other data (resuming with resume_other_data=true) keeps its own sample
    p2, n2 = sphere_points(1200, radius=0.3, seed=5)
    other = NeuralPointSDF(num_points=500, init=PointInit(p2, n2), backend="reference")
    mine = other.data_points.clone()
    other.load_state_dict(net.state_dict())
    assert torch.equal(other.data_points, mine) and other.data_spacing.shape == (1200,)


def test_trim_grows_only_from_vertices_beyond_the_limit():
    # a strip of triangles (vertex i joined to i+1 and i+2), reach per vertex below: the
    # region 1-3 holds a vertex beyond the limit (2), the region 6-7 does not
    faces = np.array([[i, i + 1, i + 2] for i in range(8)])
    reach = np.array([0.1, 0.8, 1.5, 0.75, 0.2, 0.3, 0.9, 0.95, 0.1, 0.1])
    trim = Trim(lambda x: x, limit=1.0, grow=0.7)
    assert trim.dropped(reach, faces).nonzero()[0].tolist() == [1, 2, 3]
    pointwise = Trim(lambda x: x, limit=1.0, grow=1.0)
    assert pointwise.dropped(reach, faces).nonzero()[0].tolist() == [2]
    with pytest.raises(ValueError, match="grow"):
        Trim(lambda x: x, limit=1.0, grow=1.2)
    with pytest.raises(ValueError, match="model.trim_grow"):
        p, n = sphere_points(500)
        NeuralPointSDF(num_points=100, init=PointInit(p, n), trim_grow=2.0, backend="reference")


def test_a_checkpoint_without_the_input_sample_trims_by_the_neural_points():
    p, n = sphere_points(2000)
    net = NeuralPointSDF(num_points=500, init=PointInit(p, n), backend="reference")
    net.data_points = net.data_spacing = None  # as a net loaded from an earlier version
    trim = net.surface_trim()
    assert trim.limit == trim.grow == net.far_end
    q = torch.rand(300, 3) - 0.5
    nearest = (q[:, None] - net.points.detach()[None]).norm(dim=-1).min(dim=1).values
    torch.testing.assert_close(trim.reach(q), nearest / net.spacing)
