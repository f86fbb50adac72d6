"""Renders a mesh to a PNG with matplotlib (for the README's picture).

    python docs/render_mesh.py outputs/train/runs/<run>/mesh.ply docs/images/default_shape.png

Needs matplotlib, which is not a dependency of neusdf (``pip install matplotlib``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import trimesh


def render(mesh_path: str, png_path: str, elev: float = 25.0, azim: float = -60.0) -> None:
    """Draws the mesh with Lambert shading from one light, saves a 900x900 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    mesh = trimesh.load(mesh_path, force="mesh")
    tris = mesh.vertices[mesh.faces]
    light = np.array([0.4, -0.5, 0.8])
    light /= np.linalg.norm(light)
    shade = 0.25 + 0.75 * np.clip(mesh.face_normals @ light, 0.0, 1.0)
    colors = np.stack([0.55 * shade, 0.7 * shade, 0.95 * shade, np.ones_like(shade)], axis=1)
    fig = plt.figure(figsize=(6, 6), dpi=150)
    ax = fig.add_subplot(projection="3d")
    ax.add_collection3d(Poly3DCollection(tris, facecolors=colors, edgecolors="none"))
    lo, hi = mesh.bounds
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre, strict=True):
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=elev, azim=azim)
    ax.set_axis_off()
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, bbox_inches="tight", pad_inches=0.05)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python docs/render_mesh.py MESH PNG")
    render(sys.argv[1], sys.argv[2])
