"""Shared fixtures: config composition, tiny shapes, and paths to the shared test meshes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
from omegaconf import DictConfig

from neusdf.config import compose_config, compose_train_config, register_resolvers

# The checkout (train.py, the command-line entry, is run from here).
ROOT = Path(__file__).resolve().parents[1]
SHARED_MESHES = ROOT.parent / "shared" / "data" / "meshes"

register_resolvers()


def compose_train(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The train config as train.py would see it (run directory: output_dir or unset)."""
    if output_dir is not None:
        return compose_train_config(overrides, output_dir)
    return compose_config("train", overrides)


def tiny_overrides(shape: Path, backend: str = "reference") -> list[str]:
    """A run of a few CPU steps on ``shape`` without TensorBoard (fast, for tests)."""
    return [
        "debug=default",
        f"data.path={shape}",
        f"model.backend={backend}",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
    ]


@pytest.fixture(scope="session")
def sphere_mesh_path(tmp_path_factory) -> Path:
    """A sphere of radius 0.3 centred at (1, 2, 3), as an obj (a non-normalised input)."""
    path = tmp_path_factory.mktemp("shapes") / "sphere.obj"
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    mesh.apply_translation([1.0, 2.0, 3.0])
    mesh.export(path)
    return path


@pytest.fixture(scope="session")
def sphere_points_path(tmp_path_factory) -> Path:
    """An oriented point cloud (npz) of 4000 points on the unit sphere."""
    rng = np.random.default_rng(0)
    n = rng.normal(size=(4000, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("shapes") / "sphere.npz"
    np.savez(path, points=n, normals=n)
    return path
