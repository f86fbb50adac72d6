"""Shapes held out from the choice of settings: generated, in no file of the repository.

The seven benchmark shapes chose the defaults (three of them tuned, four confirmed). These
test the same failure modes on geometry the defaults were not chosen on, each watertight (one
exception: the rod's noisy input helped choose the noisy-input Eikonal weight, see
docs/training.md):

- ``plate``: a thin slab, 1 x 0.7 x 0.04 (thickness 4% of its length; sparse input puts about
  three point spacings across it);
- ``tube``: a thin-walled open-ended tube, radii 0.30 and 0.34, height 0.8 (genus 1);
- ``twins``: two spheres of radius 0.3 whose surfaces are 0.02 apart (close parts that must
  not merge);
- ``shell``: a hollow sphere, radii 0.45 and 0.40 (a closed cavity: without normals its inner
  wall must be oriented into the cavity);
- ``rod``: a thin cylinder, radius 0.025, height 0.9 (a needle: 5.6% of its length across);
- ``rings``: two linked tori, ring radius 0.3, tube radius 0.05 (genus 2 in two parts that
  interlock without touching);
- ``knot``: a trefoil knot, a tube of radius 0.06 whose strands pass 0.062 apart (genus 1,
  knotted);
- ``spring``: a capped helical tube, radius 0.04, four turns of radius 0.3 whose coils are
  0.02 apart (one part folded back on itself, like ``twins`` along its whole length);
- ``spiky``: a sphere of radius 0.3 with twelve smooth spikes 0.2 tall (thin tips of high
  curvature);
- ``gear``: a 20-tooth gear, radii 0.33 and 0.4, 0.15 thick (flat faces, sharp creases and
  corners).

The first three were added in the seventh session, the next three in the thirty-fourth, the
last four in the thirty-seventh. Sizes are before the benchmark scales each shape's longest
side to 1.

    python benchmarks/held_out_shapes.py /tmp/ho     # writes plate.ply, tube.ply, ... gear.ply
    python benchmarks/poisson.py ho_poisson.json --shape-file plate=/tmp/ho/plate.ply ...
    python benchmarks/quality.py ho.json --poisson ho_poisson.json --shape-file plate=... ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import trimesh
from trimesh.creation import annulus, box, cylinder, icosahedron, icosphere, torus
from trimesh.remesh import subdivide_to_size


def _tube(curve: np.ndarray, radius: float, closed: bool, sections: int = 48) -> trimesh.Trimesh:
    """A tube of ``radius`` around (M, 3) ``curve`` points (a loop when ``closed``, else capped
    with a fan at each end). Each ring lies in the plane of the curve's Frenet normal and
    binormal, taken from finite differences (the curve must have no straight stretch)."""
    step = np.roll(curve, -1, 0) - np.roll(curve, 1, 0)
    if not closed:  # one-sided differences at the ends
        step[0], step[-1] = curve[1] - curve[0], curve[-1] - curve[-2]
    tangent = step / np.linalg.norm(step, axis=1, keepdims=True)
    bend = np.gradient(tangent, axis=0)
    normal = bend / np.linalg.norm(bend, axis=1, keepdims=True)
    binormal = np.cross(tangent, normal)
    a = 2 * np.pi * np.arange(sections) / sections
    rings = curve[:, None] + radius * (
        np.cos(a)[None, :, None] * normal[:, None] + np.sin(a)[None, :, None] * binormal[:, None]
    )
    m = len(curve)
    i = np.arange(m if closed else m - 1)[:, None] * sections
    j = np.arange(sections)[None]
    jn = (j + 1) % sections
    i_next = (i + sections) % (m * sections)
    faces = [
        np.stack([i + j, i_next + j, i_next + jn], -1),
        np.stack([i + j, i_next + jn, i + jn], -1),
    ]
    verts = rings.reshape(-1, 3)
    if not closed:
        ends = len(verts) + np.arange(2)
        verts = np.concatenate([verts, curve[[0, -1]]])
        last = (m - 1) * sections
        ring = np.arange(sections)
        faces.append(np.stack([np.full(sections, ends[0]), (ring + 1) % sections, ring], -1))
        faces.append(
            np.stack([np.full(sections, ends[1]), last + ring, last + (ring + 1) % sections], -1)
        )
    mesh = trimesh.Trimesh(verts, np.concatenate([f.reshape(-1, 3) for f in faces]))
    mesh.fix_normals()  # consistent and outward, whatever the frame's handedness
    return mesh


def _spiky() -> trimesh.Trimesh:
    """A sphere of radius 0.3 pushed out into a smooth spike 0.2 tall towards each vertex of an
    icosahedron (within 0.15 rad of it)."""
    sphere = icosphere(subdivisions=6, radius=1.0)
    dirs = icosahedron().vertices
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    angle = np.arccos(np.clip(sphere.vertices @ dirs.T, -1.0, 1.0))
    radius = 0.3 + 0.2 * (np.clip(1 - angle / 0.15, 0, None) ** 2).sum(1)
    return trimesh.Trimesh(sphere.vertices * radius[:, None], sphere.faces)


def _gear(teeth: int = 20, r_root: float = 0.33, r_tip: float = 0.4, thick: float = 0.15):
    """A spur gear with straight flanks: each tooth rises, stays, falls and rests a quarter of
    its pitch. Caps are fans from the axis (the profile is star-shaped about it)."""
    pitch = 2 * np.pi / teeth
    angle = np.arange(4 * teeth) * pitch / 4
    radius = np.tile([r_root, r_tip, r_tip, r_root], teeth)
    ring = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    m = len(ring)
    verts = np.concatenate(
        [np.c_[ring, np.full(m, -thick / 2)], np.c_[ring, np.full(m, thick / 2)],
         [[0, 0, -thick / 2], [0, 0, thick / 2]]]
    )  # fmt: skip
    j = np.arange(m)
    jn = (j + 1) % m
    axis = np.full(m, 2 * m)
    sides = [np.stack([j, jn, m + jn], 1), np.stack([j, m + jn, m + j], 1)]
    caps = [np.stack([axis, jn, j], 1), np.stack([axis + 1, m + j, m + jn], 1)]
    faces = np.concatenate(sides + caps)
    mesh = trimesh.Trimesh(verts, faces)
    mesh.fix_normals()
    return mesh


def held_out_shapes() -> dict[str, trimesh.Trimesh]:
    """name -> watertight mesh (deterministic)."""
    plate = box(extents=(1.0, 0.7, 0.04))
    # small faces, so that the mesh's own vertices do not favour the corners
    plate = trimesh.Trimesh(*subdivide_to_size(plate.vertices, plate.faces, 0.02))
    tube = annulus(r_min=0.30, r_max=0.34, height=0.8, sections=128)
    left, right = icosphere(subdivisions=5, radius=0.3), icosphere(subdivisions=5, radius=0.3)
    right.apply_translation((0.62, 0.0, 0.0))
    outer, inner = icosphere(subdivisions=5, radius=0.45), icosphere(subdivisions=5, radius=0.40)
    inner.invert()  # the cavity's wall faces into the cavity
    rod = cylinder(radius=0.025, height=0.9, sections=64)
    rod = trimesh.Trimesh(*subdivide_to_size(rod.vertices, rod.faces, 0.02))
    ring = torus(major_radius=0.3, minor_radius=0.05, major_sections=96, minor_sections=32)
    # the second ring in the xz plane through the first one's hole: the tubes' centre circles
    # stay 0.3 apart, so the tubes (radius 0.05) never touch
    linked = ring.copy()
    linked.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    linked.apply_translation((0.3, 0.0, 0.0))
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    trefoil = np.stack(
        [np.sin(t) + 2 * np.sin(2 * t), np.cos(t) - 2 * np.cos(2 * t), -np.sin(3 * t)], 1
    )
    # four turns of radius 0.3, rising 0.1 a turn: coils of radius 0.04 leave gaps of 0.02
    t = np.linspace(0, 8 * np.pi, 801)
    helix = np.stack([0.3 * np.cos(t), 0.3 * np.sin(t), 0.1 * t / (2 * np.pi)], 1)
    return {
        "plate": plate,
        "tube": tube,
        "twins": trimesh.util.concatenate([left, right]),
        "shell": trimesh.util.concatenate([outer, inner]),
        "rod": rod,
        "rings": trimesh.util.concatenate([ring, linked]),
        "knot": _tube(0.15 * trefoil, radius=0.06, closed=True),
        "spring": _tube(helix, radius=0.04, closed=False),
        "spiky": _spiky(),
        "gear": _gear(),
    }


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write <name>.ply into (created if missing)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, mesh in held_out_shapes().items():
        path = out / f"{name}.ply"
        if path.exists():
            print(f"{path}: exists, kept")
            continue
        mesh.export(path)
        print(f"{path}: {len(mesh.faces)} faces, watertight {mesh.is_watertight}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
