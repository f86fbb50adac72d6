"""Loading every supported format, normalisation and per-step sampling."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import trimesh
from conftest import SHARED_MESHES

from neusdf.data import SamplingConfig, ShapeDataModule, draw_samples
from neusdf.geometry import Normalization, _path_parity, estimate_normals, host_threads
from neusdf.mesh_io import load_shape, save_mesh


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".stl", ".off"])
def test_meshes_load_in_their_coordinates(tmp_path, suffix):
    mesh = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    mesh.apply_translation([5.0, 0.0, -1.0])
    path = tmp_path / f"box{suffix}"
    mesh.export(path)
    shape = load_shape(path)
    assert shape.is_mesh and shape.normals is None
    np.testing.assert_allclose(shape.points.min(0), [4.0, -0.5, -1.25], atol=1e-6)


def test_point_clouds_with_and_without_normals(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(100, 3))
    nrm = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    np.savetxt(tmp_path / "a.xyz", np.hstack([pts, nrm]))
    np.savetxt(tmp_path / "b.xyz", pts)
    np.savez(tmp_path / "c.npz", points=pts, normals=nrm)
    np.savez(tmp_path / "d.npz", points=pts)
    cloud = trimesh.Trimesh(pts, np.zeros((0, 3), int), vertex_normals=nrm, process=False)
    (tmp_path / "e.ply").write_bytes(trimesh.exchange.ply.export_ply(cloud, vertex_normal=True))
    trimesh.PointCloud(pts).export(tmp_path / "f.ply")
    for name, has_normals in [
        ("a.xyz", True),
        ("b.xyz", False),
        ("c.npz", True),
        ("d.npz", False),
        ("e.ply", True),
        ("f.ply", False),
    ]:
        s = load_shape(tmp_path / name)
        assert not s.is_mesh, name
        np.testing.assert_allclose(s.points, pts, rtol=1e-6, atol=1e-6, err_msg=name)
        assert (s.normals is not None) == has_normals, name
        if has_normals:
            np.testing.assert_allclose(s.normals, nrm, atol=1e-6, err_msg=name)


def test_normalisation_round_trip():
    pts = np.random.default_rng(1).uniform([-3, 10, 0], [5, 12, 1], size=(500, 3))
    norm = Normalization.of(pts)
    unit = norm.to_unit(pts)
    np.testing.assert_allclose(unit.max(0) + unit.min(0), 0, atol=1e-12)  # centred bbox
    assert (unit.max(0) - unit.min(0)).max() == pytest.approx(1.0)  # longest side 1
    np.testing.assert_allclose(norm.from_unit(unit), pts, atol=1e-12)


def test_datamodule_normalises_and_samples_the_mesh(sphere_mesh_path):
    dm = ShapeDataModule(str(sphere_mesh_path), surface_samples=5000, box=0.55)
    dm.load()
    assert dm.has_normals  # face normals of the sampled triangles
    p, n = dm.surface.points.double(), dm.surface.normals.double()
    assert p.shape == (5000, 3)
    # sphere of radius 0.3 -> radius 0.5 in the unit box, normals radial and outward
    assert (p.norm(dim=1) - 0.5).abs().max() < 0.01
    assert (torch.nn.functional.cosine_similarity(p, n) > 0.99).all()


def test_draw_samples_shapes_ranges_and_seeds(sphere_points_path):
    dm = ShapeDataModule(str(sphere_points_path))
    dm.load()
    pts, nrm = dm.surface.points, dm.surface.normals

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        sampling = SamplingConfig(
            surface=64, space=32, near=48, near_sigmas=(0.01, 0.002), box=0.55
        )
        return draw_samples(pts, nrm, sampling, g)

    a, b, c = draw(0), draw(0), draw(1)
    assert a["surface"].shape == (64, 3) and a["surface_normals"].shape == (64, 3)
    assert a["space"].shape == (32, 3) and a["space"].abs().max() <= 0.55
    assert a["near"].shape == (48, 3) and a["near_offset"].shape == (48,)
    assert torch.equal(a["space"], b["space"])  # same seed, same samples
    assert not torch.equal(a["space"], c["space"])  # another rank's seed, other samples
    # each near sample lies on its source point's normal line, so its offset is its exact
    # signed distance to the sphere (an isotropic jitter's normal component would be off by up
    # to a few 1e-4 here: curvature times the tangential jitter squared)
    norm = dm.normalization
    centre = torch.as_tensor(-norm.center / norm.scale, dtype=torch.float32)
    r = (a["near"] - centre).norm(dim=1) - 1 / norm.scale
    assert (r - a["near_offset"]).abs().max() < 1e-5
    assert a["near_offset"].abs().max() > 0.005  # the wider slice does reach off the surface
    # without normals: near samples (for the Eikonal term) but no target
    g = torch.Generator().manual_seed(0)
    bare = draw_samples(pts, None, SamplingConfig(8, 8, 48, (0.01,), 0.55), g)
    assert bare["near_offset"] is None and bare["near"].shape == (48, 3)


def test_noisy_points_without_normals_get_a_wider_pca(tmp_path):
    """Noise near the point spacing tilts a 16-point plane fit by over 10 degrees; input
    measured as noisy gets 64 points."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=(20000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    path = tmp_path / "noisy_sphere.npz"
    np.savez(path, points=0.4 * d + rng.normal(scale=0.006, size=d.shape))

    def mean_angle(**kwargs):
        dm = ShapeDataModule(str(path), **kwargs)
        dm.load()
        cos = (dm.surface.normals.double().numpy() * d).sum(1)
        assert (cos > 0).mean() > 0.99  # oriented outward either way
        return np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()

    assert mean_angle(normal_neighbours=16) > 10
    assert mean_angle() < 5
    with pytest.raises(ValueError, match="data.normal_neighbours"):
        ShapeDataModule(str(path), normal_neighbours=2)


def test_estimated_normals_point_outward():
    d = np.random.default_rng(2).normal(size=(2000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    n = estimate_normals(d)
    assert (np.einsum("ij,ij->i", n, d) > 0.95).all()


def test_host_threads_follow_affinity_and_omp_num_threads(monkeypatch):
    """k-d tree queries take this process's share of the cores, not every core."""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert host_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert host_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 5))
    assert host_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert host_threads() == cores


def test_save_mesh_is_atomic_and_does_not_overwrite(tmp_path):
    box = trimesh.creation.box()
    path = tmp_path / "m.ply"
    save_mesh(path, box.vertices, box.faces)
    assert load_shape(path).faces.shape == (12, 3)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        save_mesh(path, box.vertices, box.faces)
    save_mesh(path, box.vertices[:, ::-1], box.faces, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "name", ["stanford-bunny.obj", "fandisk.obj", "rocker-arm.obj", "torus.stl"]
)
def test_shared_meshes_load_and_normalise(name):
    path = SHARED_MESHES / name
    if not path.is_file():  # per file: a partly present folder tests what it has
        pytest.skip(f"shared test mesh {name} not present")
    shape = load_shape(path)
    assert shape.is_mesh and len(shape.faces) > 1000
    unit = Normalization.of(shape.points).to_unit(shape.points)
    assert (unit.max(0) - unit.min(0)).max() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", ["random", "chain"])
def test_path_parity_is_the_xor_along_each_path(shape):
    # the orientation pass flips a point when the XOR of sign disagreements on its tree path
    # to the root is set; pointer jumping must give what walking the path gives, in a forest
    rng = np.random.default_rng(7)
    n = 3000
    perm = rng.permutation(n)
    roots = {int(perm[0]), int(perm[n // 3])}  # two trees: perm[:n//3] and perm[n//3:]
    parent = np.arange(n)
    for i in range(1, n):
        if int(perm[i]) in roots:
            continue
        first = 0 if i < n // 3 else n // 3  # parents come earlier in the same tree
        parent[perm[i]] = perm[i - 1] if shape == "chain" else perm[rng.integers(first, i)]
    bit = rng.random(n) < 0.5
    want = np.zeros(n, dtype=bool)
    for v in range(n):
        x, u = False, v
        while parent[u] != u:
            x ^= bool(bit[u])
            u = parent[u]
        want[v] = x
    np.testing.assert_array_equal(_path_parity(bit, parent), want)
