"""End to end: a tiny training run, its outputs, extraction, resume and refusals."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh
from conftest import ROOT, compose_train, tiny_overrides

from neusdf import extract
from neusdf.checkpoint import CheckpointError, load_checkpoint
from neusdf.metrics import METRIC_KEYS
from neusdf.pipeline import train


@pytest.fixture(scope="module")
def backend() -> str:
    """The project default, the compiled op: a build that fails fails these tests."""
    return "compiled"


@pytest.fixture(scope="module")
def run(tmp_path_factory, sphere_mesh_path, backend):
    out = tmp_path_factory.mktemp("run")
    metrics = train(compose_train(tiny_overrides(sphere_mesh_path, backend), out))
    return out, metrics


def test_run_writes_checkpoints_mesh_and_metrics(run):
    out, metrics = run
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "mesh.ply", "metrics.json"):
        assert (out / name).is_file(), name
    # last.ckpt is the final state, even though training stops between validations
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    saved = json.loads((out / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert saved[k] == pytest.approx(metrics[k]), k
    t = saved["timing"]
    assert t["steps"] == 6 and t["steps_per_second"] > 0
    # the loop's own clock runs inside fit's; debug=default draws 256 + 128 + 128 per step
    assert 0 < t["loop_seconds"] < t["fit_seconds"] and t["samples_per_step"] == 512
    # wall-clock start and end of the run (UNIX seconds), at least its parts apart
    assert t["finished_at"] - t["started_at"] >= t["fit_seconds"] + t["extract_seconds"]
    # the mesh is in the input's coordinates: a sphere of radius 0.3 around (1, 2, 3)
    mesh = trimesh.load(out / "mesh.ply")
    r = np.linalg.norm(mesh.vertices - [1.0, 2.0, 3.0], axis=1)
    assert np.abs(r - 0.3).max() < 0.03
    # six steps from the implicit-MLS initialisation already give a usable surface (unit box)
    assert metrics["chamfer_l1"] < 0.01 and metrics["normal_consistency"] > 0.95


def test_csv_logger_has_train_and_val_metrics(run):
    out, _ = run
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "train/loss_surface",
        "train/loss_eikonal",
        "train/loss_normal",
        "val/chamfer_l1",
        "val/eikonal_residual",
    ):
        assert key in header, key


def test_extract_command(run, tmp_path, sphere_mesh_path, capsys):
    out, _ = run
    mesh_path = tmp_path / "m.obj"
    args = [
        f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
        "resolution=40",
        f"output={mesh_path}",
        f"reference={sphere_mesh_path}",
        "num_query=5000",
        "num_ref=20000",
    ]
    assert extract.main(args) == 0
    mesh = trimesh.load(mesh_path)
    assert np.abs(np.linalg.norm(mesh.vertices - [1, 2, 3], axis=1) - 0.3).max() < 0.03
    m = json.loads(mesh_path.with_suffix(".metrics.json").read_text())
    assert m["chamfer_l1"] < 0.01
    before = mesh_path.read_bytes()
    assert extract.main(args) == 1  # refuses to overwrite
    assert "overwrite=true" in capsys.readouterr().err
    assert mesh_path.read_bytes() == before
    assert extract.main([*args, "overwrite=true"]) == 0


def test_extract_defaults_to_the_run_directory(run, sphere_mesh_path, tmp_path, capsys):
    out, _ = run
    args = [
        f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
        "resolution=24",
        f"reference={sphere_mesh_path}",
        "num_query=2000",
        "num_ref=5000",
    ]
    try:
        assert extract.main(args) == 0
        assert (out / "last_mesh24.ply").is_file() and (out / "last_mesh24.metrics.json").is_file()
        assert "| last_mesh24.ply | " in capsys.readouterr().out  # the table's row is named
    finally:
        for name in ("last_mesh24.ply", "last_mesh24.metrics.json"):
            (out / name).unlink(missing_ok=True)
    missing = tmp_path / "missing.ply"
    assert extract.main([*args, f"reference={missing}", f"output={tmp_path / 'm.ply'}"]) == 1
    assert f"error: reference: shape file '{missing}' does not exist" in capsys.readouterr().err


def test_extract_command_bad_arguments(tmp_path, capsys):
    assert extract.main(["resolution=32"]) == 2
    assert "ckpt is required" in capsys.readouterr().err
    assert extract.main(["ckpt=x.ckpt", "no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert extract.main(["ckpt=x.ckpt", "resolution=abc"]) == 2
    assert "resolution must be of type int, got 'abc'" in capsys.readouterr().err
    assert extract.main([f"ckpt={tmp_path / 'missing.ckpt'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert extract.main([f"ckpt={tmp_path / 'junk.ckpt'}"]) == 1
    assert "could not be read" in capsys.readouterr().err


def test_checkpoint_loads_without_the_data(run, sphere_mesh_path):
    out, _ = run
    loaded = load_checkpoint(out / "checkpoints" / "last.ckpt", backend="reference")
    np.testing.assert_allclose(loaded.normalization.center, [1, 2, 3], atol=1e-6)
    # the sphere has radius 0.5 in the unit box: its centre is inside, (0, 0, 0.54) outside
    q = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.54]])
    with torch.no_grad():
        s = loaded.net(q)
    assert s[0] < 0 < s[1]


def test_resume_continues_and_other_configs_are_refused(run, sphere_mesh_path, backend, tmp_path):
    out, _ = run
    last = out / "checkpoints" / "last.ckpt"
    base = [*tiny_overrides(sphere_mesh_path, backend), f"ckpt_path={last}"]
    metrics = train(compose_train([*base, "trainer.max_steps=9"], tmp_path / "resumed"))
    assert metrics["timing"]["steps"] == 9
    with pytest.raises(CheckpointError, match="model.feature_dim: checkpoint 8, this run 4"):
        train(compose_train([*base, "model.feature_dim=4", "trainer.max_steps=9"], tmp_path / "x"))


def test_existing_outputs_are_not_overwritten(run, sphere_mesh_path, backend):
    out, _ = run
    before = (out / "mesh.ply").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        train(compose_train(tiny_overrides(sphere_mesh_path, backend), out))
    assert (out / "mesh.ply").read_bytes() == before
    # an interrupted run left checkpoints but no mesh: still refused
    (out / "mesh.ply").rename(out / "mesh.keep")
    (out / "metrics.json").rename(out / "metrics.keep")
    try:
        with pytest.raises(FileExistsError, match="already holds checkpoints"):
            train(compose_train(tiny_overrides(sphere_mesh_path, backend), out))
    finally:
        (out / "mesh.keep").rename(out / "mesh.ply")
        (out / "metrics.keep").rename(out / "metrics.json")


def test_point_cloud_without_normals_trains_on_estimated_normals(tmp_path, backend, caplog):
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    np.savetxt(tmp_path / "cloud.xyz", 2.0 * d)
    with caplog.at_level(logging.INFO):
        metrics = train(
            compose_train(tiny_overrides(tmp_path / "cloud.xyz", backend), tmp_path / "run")
        )
    assert "estimated and oriented 3000 normals" in caplog.text
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_normal" in header and "train/loss_eikonal" in header
    assert metrics["input"]["has_normals"] is False
    # oriented estimated normals make a correctly signed sphere of radius 2 (input units)
    mesh = trimesh.load(tmp_path / "run" / "mesh.ply")
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 2.0**3, rel=0.1)
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 2.0).mean() < 0.02


def test_fast_dev_run(tmp_path, sphere_mesh_path, backend):
    overrides = [*tiny_overrides(sphere_mesh_path, backend), "debug=fdr"]
    metrics = train(compose_train(overrides, tmp_path))
    assert metrics["timing"]["steps"] == 1 and (tmp_path / "mesh.ply").is_file()
    # as configs/debug/fdr.yaml says: no checkpoints or logs
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "csv").exists()


def test_command_line_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "debug=default",
            f"data.path={tmp_path / 'missing.ply'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "missing.ply' does not exist" in output
    assert "Traceback" not in output
