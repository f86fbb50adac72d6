"""The default shape: generated from a closed-form SDF, also used by the extraction tests.

The default shape (``data/default_shape.ply``) is a torus (a hole) smoothly joined to a ball
(curvature) and a thin fin (a thin part), meshed by marching cubes from its analytic SDF so
the out-of-the-box run needs no download. Regenerate it with::

    python -m neusdf.shapes data/default_shape.ply --overwrite
"""

from __future__ import annotations

import argparse

import numpy as np
import trimesh
from skimage.measure import marching_cubes

from neusdf.mesh_io import save_mesh

__all__ = ["default_shape_sdf", "make_default_shape", "orient_outward"]


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (a smooth union of two SDFs, blending over width k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def default_shape_sdf(x: np.ndarray) -> np.ndarray:
    """SDF-like field of the default shape (exact away from the blends): (N, 3) -> (N,)."""
    # Torus of major radius 0.28 and tube radius 0.09 around z: the hole.
    q = np.stack([np.linalg.norm(x[..., :2], axis=-1) - 0.28, x[..., 2]], axis=-1)
    torus = np.linalg.norm(q, axis=-1) - 0.09
    # Ball sitting on the ring: curvature of another scale.
    ball = np.linalg.norm(x - np.array([0.3, 0.0, 0.12]), axis=-1) - 0.14
    # Thin rounded plate (thickness 0.03) standing on the opposite side of the ring.
    d = np.abs(x - np.array([-0.36, 0.0, 0.1])) - np.array([0.015, 0.16, 0.13])
    fin = np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0) - 0.005
    return _smooth_min(_smooth_min(torus, ball, 0.04), fin, 0.03)


def orient_outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Returns ``faces`` wound so that the signed volume is positive (normals point out)."""
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    return faces[:, ::-1].copy() if mesh.volume < 0 else faces


def make_default_shape(resolution: int = 112) -> trimesh.Trimesh:
    """Meshes :func:`default_shape_sdf` on a ``resolution``^3 grid over [-0.6, 0.6]^3."""
    lin = np.linspace(-0.6, 0.6, resolution)
    grid = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), axis=-1)
    sdf = default_shape_sdf(grid.reshape(-1, 3)).reshape(grid.shape[:3])
    h = lin[1] - lin[0]
    verts, faces, _, _ = marching_cubes(sdf, 0.0, spacing=(h, h, h))
    verts = verts - 0.6
    return trimesh.Trimesh(verts, orient_outward(verts, faces), process=False)


def main() -> None:
    """CLI: writes the default shape to the given path."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("output", help="output mesh (.ply or .obj)")
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    mesh = make_default_shape(args.resolution)
    save_mesh(args.output, mesh.vertices, mesh.faces, overwrite=args.overwrite)
    print(f"wrote {args.output}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces")


if __name__ == "__main__":
    main()
