"""Connected components of the meshes a quality run kept, and the input points nearest each.

A spurious piece of surface (a bubble, a fragment beside a thin part) lies near the data but is
nearest to few of its points; a real part gets its share of them by area. For each
``<shape>_<setting>_neusdf/mesh.ply`` in a ``quality.py --workdir`` folder, with the input
``<shape>_<setting>.npz`` beside it, this lists the mesh's components by area with:

- ``faces`` and ``area_fraction`` (of the mesh's area);
- ``support``: input points whose nearest mesh vertex is in the component;
- ``expected``: the support the component's area fraction predicts;
- ``max_distance_spacings``: its vertices' largest distance to the input, in median
  nearest-neighbour spacings of the input.

    python benchmarks/quality.py q.json --workdir /tmp/wd ...
    python benchmarks/mesh_components.py components.json /tmp/wd [/tmp/wd2 ...]

Prints one line per mesh (the largest component and every one with less than half its
expected support) and writes the JSON atomically (an existing file is kept unless --overwrite).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from neusdf.mesh_io import load_shape, save_json

# Components listed per mesh, largest first (a mesh can break into thousands of specks).
MAX_LISTED = 40


def mesh_components(points: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> list[dict]:
    """The components of a mesh, largest area first, each with its support by ``points``.

    Args:
        points: (N, 3) input points. verts: (V, 3) mesh vertices. faces: (F, 3) int indices.

    Returns:
        one dict per component: ``faces``, ``area_fraction``, ``support``, ``expected``,
        ``max_distance_spacings`` (see the module docstring).
    """
    n = len(verts)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), (n, n))
    count, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    corner = verts[faces]
    area = 0.5 * np.linalg.norm(
        np.cross(corner[:, 1] - corner[:, 0], corner[:, 2] - corner[:, 0]), axis=1
    )
    comp_area = np.bincount(face_label, area, count)
    comp_faces = np.bincount(face_label, minlength=count)
    _, nearest = cKDTree(verts).query(points)
    support = np.bincount(label[nearest], minlength=count)
    tree = cKDTree(points)
    spacing = np.median(tree.query(points, k=2)[0][:, 1])
    reach = np.zeros(count)
    np.maximum.at(reach, label, tree.query(verts)[0])
    fraction = comp_area / comp_area.sum()
    return [
        {
            "faces": int(comp_faces[c]),
            "area_fraction": float(fraction[c]),
            "support": int(support[c]),
            "expected": float(len(points) * fraction[c]),
            "max_distance_spacings": float(reach[c] / spacing),
        }
        for c in np.argsort(-comp_area)
    ]


def main() -> int:
    """CLI; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", help="output JSON")
    ap.add_argument("workdirs", nargs="+", help="quality.py --workdir folders")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args()
    if Path(args.json).exists() and not args.overwrite:
        ap.error(f"{args.json} exists (--overwrite to replace it)")
    out = {}
    for workdir in map(Path, args.workdirs):
        for mesh in sorted(workdir.glob("*_neusdf/mesh.ply")):
            name = mesh.parent.name.removesuffix("_neusdf")
            inputs = workdir / f"{name}.npz"
            if name.startswith("warmup") or not inputs.exists():
                continue
            points = np.load(inputs)["points"].astype(np.float64)
            shape = load_shape(mesh)
            comps = mesh_components(points, np.asarray(shape.points, np.float64), shape.faces)
            out[f"{workdir.name}/{name}"] = {
                "points": len(points),
                "components": len(comps),
                "listed": comps[:MAX_LISTED],
            }
            weak = [c for c in comps[1:] if c["support"] < 0.5 * c["expected"]]
            print(
                f"{workdir.name}/{name}: {len(comps)} components; largest {comps[0]['faces']} "
                f"faces; under half their support: "
                + (
                    ", ".join(
                        f"{c['faces']} faces {c['support']}/{c['expected']:.1f}" for c in weak
                    )
                    or "none"
                ),
                flush=True,
            )
    save_json(args.json, out, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
