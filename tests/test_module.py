"""The Lightning module's visuals: the SDF cross-section image and the TensorBoard logging."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import trimesh
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neusdf.data import SamplingConfig
from neusdf.model import NeuralPointSDF, PointInit
from neusdf.module import SDFModule, section_image


def ball(center, radius):
    c = torch.tensor(center)
    return lambda q: (q - c).norm(dim=-1) - radius


def test_section_image_colours_sides_and_draws_the_zero_contour():
    n, box = 65, 0.5
    img = section_image(ball((0.0, 0.0, 0.0), 0.25), n, box, "cpu")
    assert img.shape == (n, n, 3) and img.dtype == np.uint8
    mid = n // 2
    centre, corner = img[mid, mid].astype(int), img[0, 0].astype(int)
    assert centre[2] > centre[0]  # inside: blue
    assert corner[0] > corner[2]  # outside: red
    # the zero contour is black where the middle row crosses the circle (pixel size 1/64)
    row = img[mid].astype(int).sum(-1)
    black = np.flatnonzero(row == 0)
    x = -box + 2 * box * black / (n - 1)
    assert len(black) >= 2 and np.abs(np.abs(x) - 0.25).max() <= 2 * box / (n - 1)
    # everything black lies on the contour (no stray black pixels)
    lin = np.linspace(-box, box, n)
    a, b = np.meshgrid(lin, lin[::-1], indexing="xy")
    r = np.hypot(a, b)
    assert np.abs(r[(img.astype(int).sum(-1) == 0)] - 0.25).max() <= 2 * box / (n - 1)


@pytest.mark.parametrize(
    ("center", "axis", "where"),
    [
        ((0.2, 0.0, 0.0), 2, (0, 1)),  # +x is to the right on the z = 0 plane
        ((0.0, 0.2, 0.0), 2, (-1, 0)),  # +y is up
        ((0.0, 0.0, 0.2), 0, (-1, 0)),  # on the x = 0 plane the axes are (y, z): +z is up
    ],
)
def test_section_image_orientation(center, axis, where):
    n = 41
    img = section_image(ball(center, 0.1), n, 0.5, "cpu", axis=axis)
    inside = img[..., 2].astype(int) > img[..., 0].astype(int)
    rows, cols = np.nonzero(inside)
    # the ball's centre is 0.2 / (1 / 40) = 8 pixels off the image centre; the other
    # coordinate stays within a pixel of it
    offset = np.array([rows.mean(), cols.mean()]) - n // 2
    assert tuple(np.sign(np.round(offset / 4)).astype(int)) == where
    assert np.abs(np.abs(offset).max() - 8) < 1 and np.abs(offset).min() < 1


def tiny_module(tmp_path, log_mesh: bool = True) -> SDFModule:
    d = np.random.default_rng(0).normal(size=(500, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    net = NeuralPointSDF(
        num_points=200,
        feature_dim=4,
        K=4,
        hidden=8,
        backend="reference",
        init=PointInit(0.4 * d, d),
    )
    module = SDFModule(
        net,
        model={},
        loss={"surface": 1.0},
        optim={},
        sampling=SamplingConfig(surface=8, space=8, near=8, near_sigmas=(0.01,), box=0.55),
        validation={"section_resolution": 24, "log_mesh": log_mesh},
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    module.trainer = L.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    return module


def read_events(tmp_path) -> EventAccumulator:
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("log_mesh", [True, False])
def test_log_visuals_writes_the_section_image_and_the_mesh(tmp_path, log_mesh):
    module = tiny_module(tmp_path, log_mesh)
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.4)
    module._log_visuals(np.asarray(sphere.vertices), np.asarray(sphere.faces))
    module.logger.experiment.flush()
    events = read_events(tmp_path)
    (image,) = events.Images("val/sdf_section_z0")
    assert (image.width, image.height) == (24, 24)
    mesh_tags = {t for t in events.Tags()["tensors"] if t.startswith("val/mesh")}
    if not log_mesh:
        assert not mesh_tags
        return
    assert mesh_tags == {"val/mesh_VERTEX", "val/mesh_FACE"}
    (vertices,) = events.Tensors("val/mesh_VERTEX")
    (faces,) = events.Tensors("val/mesh_FACE")
    assert list(vertices.tensor_proto.tensor_shape.dim)[1].size == len(sphere.vertices)
    assert list(faces.tensor_proto.tensor_shape.dim)[1].size == len(sphere.faces)


def test_log_visuals_is_skipped_without_tensorboard(tmp_path):
    module = tiny_module(tmp_path)
    module.trainer = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    module._log_visuals(np.zeros((3, 3)), np.array([[0, 1, 2]]))  # no writer: nothing to do
    assert not (tmp_path / "tb").exists()
