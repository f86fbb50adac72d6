"""Reading shapes (meshes and point clouds) and writing meshes and JSON, with readable errors.

Every loader returns a :class:`Shape` in the file's own coordinates; normalisation to the unit
box happens in :mod:`neusdf.geometry`. Writers are atomic (temporary file + ``os.replace``) and
refuse to replace an existing file unless ``overwrite`` is set.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

__all__ = [
    "MESH_SUFFIXES",
    "POINT_SUFFIXES",
    "Shape",
    "ShapeError",
    "atomic_write",
    "check_writable",
    "load_shape",
    "save_json",
    "save_mesh",
]

MESH_SUFFIXES = (".obj", ".ply", ".stl", ".off")
POINT_SUFFIXES = (".ply", ".xyz", ".npz")


class ShapeError(ValueError):
    """A shape file that is missing, unreadable, empty or holds invalid coordinates."""


@dataclass
class Shape:
    """One input shape in its file's coordinates.

    Attributes:
        points: (N, 3) float64 vertices (mesh) or points (point cloud), all finite.
        normals: (N, 3) float64 unit normals, or None when the file has none.
        faces: (M, 3) int64 triangles of a mesh, or None for a point cloud.
        path: the file it came from (for messages).
    """

    points: np.ndarray
    normals: np.ndarray | None
    faces: np.ndarray | None
    path: str

    @property
    def is_mesh(self) -> bool:
        """True when the shape has triangles (surface samples are drawn from them)."""
        return self.faces is not None


def _unit(n: np.ndarray, path: str) -> np.ndarray:
    """Normalises (N, 3) normals; rows of zero length are an error (they have no direction)."""
    if not np.isfinite(n).all():
        raise ShapeError(f"{path}: normals contain NaN or infinite values")
    length = np.linalg.norm(n, axis=1, keepdims=True)
    if (length < 1e-12).any():
        raise ShapeError(f"{path}: {(length < 1e-12).sum()} normals have zero length")
    return n / length


def _from_arrays(points: np.ndarray, normals: np.ndarray | None, faces, path: str) -> Shape:
    """Validates raw arrays into a :class:`Shape` (shape checks, finiteness, emptiness)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ShapeError(f"{path}: points must have shape (N, 3), got {points.shape}")
    if len(points) == 0:
        raise ShapeError(f"{path}: the shape is empty (no points or vertices)")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise ShapeError(
            f"{path}: {bad.sum()} of {len(points)} points have NaN or infinite coordinates"
        )
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64)
        if normals.shape != points.shape:
            raise ShapeError(
                f"{path}: normals must have the points' shape {points.shape}, got {normals.shape}"
            )
        normals = _unit(normals, path)
    if faces is not None:
        faces = np.asarray(faces, dtype=np.int64)
        if len(faces) == 0:
            faces = None
    extent = points.max(0) - points.min(0)
    if extent.max() <= 0:
        raise ShapeError(f"{path}: all points coincide; the shape has no extent")
    return Shape(points, normals, faces, path)


def _load_trimesh(path: str) -> Shape:
    """Reads obj/ply/stl/off through trimesh (meshes and face-less ply point clouds)."""
    try:
        obj = trimesh.load(path, force=None, process=False)
    except Exception as e:  # trimesh raises many types for corrupt files; name the file instead
        raise ShapeError(f"{path}: could not be read as a mesh or point cloud ({e})") from e
    if isinstance(obj, trimesh.Scene):
        if not obj.geometry:
            raise ShapeError(f"{path}: the file holds no geometry")
        obj = obj.to_mesh() if hasattr(obj, "to_mesh") else obj.dump(concatenate=True)
    if isinstance(obj, trimesh.Trimesh):
        if len(obj.faces) == 0:
            return _from_arrays(obj.vertices, _ply_normals(obj.metadata), None, path)
        shape = _from_arrays(obj.vertices, None, obj.faces, path)
        if trimesh.Trimesh(shape.points, shape.faces, process=False).area <= 0:
            raise ShapeError(f"{path}: the mesh has zero surface area")
        return shape
    if isinstance(obj, trimesh.PointCloud):
        return _from_arrays(obj.vertices, _ply_normals(obj.metadata), None, path)
    raise ShapeError(f"{path}: unsupported content {type(obj).__name__}")


def _ply_normals(metadata: dict) -> np.ndarray | None:
    """Per-vertex normals (nx, ny, nz) of a ply point cloud, or None when absent."""
    raw = metadata.get("_ply_raw", {}).get("vertex", {}).get("data")
    if raw is None or raw.dtype.names is None:
        return None
    if not {"nx", "ny", "nz"} <= set(raw.dtype.names):
        return None
    return np.stack([raw["nx"], raw["ny"], raw["nz"]], axis=1)


def _load_xyz(path: str) -> Shape:
    """Reads whitespace-separated ``x y z`` or ``x y z nx ny nz`` rows."""
    try:
        with warnings.catch_warnings():
            # numpy warns on an empty file; the emptiness check below says it in our words
            warnings.simplefilter("ignore", UserWarning)
            arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ShapeError(f"{path}: could not be parsed as 'x y z [nx ny nz]' rows ({e})") from e
    if arr.size == 0:
        raise ShapeError(f"{path}: the shape is empty (no points or vertices)")
    if arr.shape[1] not in (3, 6):
        raise ShapeError(f"{path}: expected 3 or 6 columns (x y z [nx ny nz]), got {arr.shape[1]}")
    return _from_arrays(arr[:, :3], arr[:, 3:] if arr.shape[1] == 6 else None, None, path)


def _load_npz(path: str) -> Shape:
    """Reads an npz with ``points`` (N, 3) and optional ``normals`` (N, 3)."""
    try:
        with np.load(path) as z:
            if "points" not in z:
                raise ShapeError(f"{path}: npz must contain an array 'points' (N, 3)")
            points = z["points"]
            normals = z["normals"] if "normals" in z else None
    except (OSError, ValueError) as e:
        raise ShapeError(f"{path}: could not be read as npz ({e})") from e
    return _from_arrays(points, normals, None, path)


def load_shape(path: str | os.PathLike) -> Shape:
    """Loads a mesh (obj, ply, stl, off) or a point cloud (ply, xyz, npz).

    Args:
        path: the file. Point clouds may carry normals (ply nx/ny/nz, 6-column xyz, npz
            ``normals``); meshes never do (face normals are derived from the triangles).

    Returns:
        A validated :class:`Shape` (finite float64 coordinates, unit normals or None).

    Raises:
        ShapeError: naming the file and what was wrong (missing, unreadable, empty, NaN, ...).
    """
    path = str(path)
    if not os.path.exists(path):
        raise ShapeError(f"shape file '{path}' does not exist")
    if os.path.isdir(path):
        raise ShapeError(f"'{path}' is a directory, a shape file was expected")
    suffix = Path(path).suffix.lower()
    if suffix == ".xyz":
        return _load_xyz(path)
    if suffix == ".npz":
        return _load_npz(path)
    if suffix in MESH_SUFFIXES:
        return _load_trimesh(path)
    known = sorted(set(MESH_SUFFIXES + POINT_SUFFIXES))
    raise ShapeError(f"'{path}' has unsupported suffix '{suffix}'; expected {known}")


def check_writable(path: str | os.PathLike, overwrite: bool) -> None:
    """Raises FileExistsError when ``path`` exists and ``overwrite`` is False."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=true to replace it")


def atomic_write(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory.

    A crash never leaves a half-written file; an existing file is only replaced with
    ``overwrite=True``.
    """
    path = Path(path)
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path: str | os.PathLike, data: dict, overwrite: bool = False) -> None:
    """Writes ``data`` as indented JSON, atomically (NaN and infinities are written as null)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    atomic_write(path, (json.dumps(clean(data), indent=2) + "\n").encode(), overwrite)


def save_mesh(
    path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, overwrite: bool = False
) -> None:
    """Saves a triangle mesh as ply or obj, atomically.

    Args:
        path: output file; the suffix (.ply or .obj) picks the format.
        vertices: (V, 3) float array. faces: (F, 3) int array of vertex indices.
        overwrite: replace an existing file (otherwise FileExistsError).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".ply", ".obj"):
        raise ValueError(f"output: mesh path '{path}' must end in .ply or .obj")
    mesh = trimesh.Trimesh(np.asarray(vertices), np.asarray(faces), process=False)
    data = mesh.export(file_type=suffix[1:])
    atomic_write(path, data.encode() if isinstance(data, str) else data, overwrite)
