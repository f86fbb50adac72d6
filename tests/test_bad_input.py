"""Bad input gets a message naming the file or option, never a library traceback."""

from __future__ import annotations

import numpy as np
import pytest

from neusdf.mesh_io import ShapeError, load_shape


def _write(path, content: bytes | str):
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ShapeError, match="^shape file '.*nope.obj' does not exist"):
        load_shape(tmp_path / "nope.obj")  # no config involved: no option named
    with pytest.raises(ShapeError, match="is a directory"):
        load_shape(tmp_path)


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ShapeError, match="unsupported suffix '.vtk'"):
        load_shape(_write(tmp_path / "a.vtk", "x"))


@pytest.mark.parametrize("name", ["bad.ply", "bad.stl", "bad.off"])
def test_unreadable_files(tmp_path, name):
    path = _write(tmp_path / name, b"\x00\x01garbage\xff" * 10)
    with pytest.raises(ShapeError, match=name):
        load_shape(path)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.obj", "# nothing here\n"),
        ("empty.off", "OFF\n0 0 0\n"),
        ("empty.xyz", ""),
    ],
)
def test_empty_shapes(tmp_path, name, content):
    with pytest.raises(ShapeError, match=name):
        load_shape(_write(tmp_path / name, content))
    np.savez(tmp_path / "empty.npz", points=np.zeros((0, 3)))
    with pytest.raises(ShapeError, match="empty"):
        load_shape(tmp_path / "empty.npz")


def test_degenerate_mesh_has_no_area(tmp_path):
    content = "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n"
    with pytest.raises(ShapeError, match="zero surface area"):
        load_shape(_write(tmp_path / "flat.obj", content))


def test_nan_coordinates(tmp_path):
    pts = np.random.default_rng(0).normal(size=(20, 3))
    pts[3, 1] = np.nan
    np.savetxt(tmp_path / "nan.xyz", pts)
    with pytest.raises(ShapeError, match="1 of 20 points have NaN"):
        load_shape(tmp_path / "nan.xyz")
    np.savez(tmp_path / "nan.npz", points=pts)
    with pytest.raises(ShapeError, match="NaN"):
        load_shape(tmp_path / "nan.npz")
    content = "v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n"
    with pytest.raises(ShapeError, match="NaN"):
        load_shape(_write(tmp_path / "nan.obj", content))


def test_malformed_point_files(tmp_path):
    np.savetxt(tmp_path / "four.xyz", np.ones((5, 4)))
    with pytest.raises(ShapeError, match="3 or 6 columns"):
        load_shape(tmp_path / "four.xyz")
    np.savez(tmp_path / "nokey.npz", xyz=np.ones((5, 3)))
    with pytest.raises(ShapeError, match="'points'"):
        load_shape(tmp_path / "nokey.npz")
    pts = np.random.default_rng(1).normal(size=(5, 3))
    np.savez(tmp_path / "zeron.npz", points=pts, normals=np.zeros((5, 3)))
    with pytest.raises(ShapeError, match="zero length"):
        load_shape(tmp_path / "zeron.npz")
    np.savez(tmp_path / "same.npz", points=np.ones((5, 3)))
    with pytest.raises(ShapeError, match="coincide"):
        load_shape(tmp_path / "same.npz")
