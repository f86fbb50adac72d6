"""A search design with gates fixed from the start, modelled on the CPU (not built).

The CUDA tile search (docs/op.md) starts every query's gate at +inf and tightens it as tiles are
scanned, which costs list insertions (about a third of its instructions at the reference
size). This script models the alternative: give each query a finite gate before the walk,
from the points around its group's place in the points' Morton order, keep that gate fixed,
prune the tiles (group box against the tile's box and smallest lam, as the kernel does) and
then each kept tile's points once for the whole group (the point's lam times its squared gap
to the group's box), and collect every point under a query's gate into a buffer, sorted once at
the end, with no insertions during the walk. For each group of G queries consecutive in Morton
order (``tile_skip_model.morton_batch``; float64, the op benchmark's inputs, ``--dist sphere``
for ``search_crossover.inputs``'s surface) it counts:

- ``ratio_exact`` / ``ratio_seed``: a query's gate over its exact K-th distance, for the K-th
  smallest key among the H points around the group's middle query (``exact``, which needs a
  selection per query) and for the cheap bound a kernel could take instead (``seed``: the
  points split into K interleaved sets, each set's smallest key, the largest of those: K
  distinct points lie at or under it);
- ``tiles_kept``: tiles of 32 some query's bound keeps under its seeded gate, against
  ``tiles_kept_oracle`` under its exact K-th distance (the least any gate allows);
- ``points_group_kept`` (and ``_oracle``): of those tiles' points, the ones whose bound over
  the group's box is at or under the group's largest gate;
- ``points_marked_lane``: of those, per query, the ones under its own per-point bound (the
  exact keys a lane computes); ``buffer_mean`` / ``buffer_max``: points whose exact key is at
  or under the query's gate (the buffer it needs).

The tile search's own counts to compare with are ``tile_skip_model.py``'s (home order, gates
from +inf): about 41 tiles a group of 32 at the reference size (7.9 home, 33.6 after).

    python benchmarks/seeded_gate_model.py out.json
    python benchmarks/seeded_gate_model.py out.json --dist sphere --group 16 --sizes reference
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neusdf.mesh_io import save_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import inputs  # noqa: E402
from tile_skip_model import SIZES, box_bound, morton_batch  # noqa: E402

TILE = 32  # points a tile (the CUDA kernel's)
COUNTS = (
    "ratio_exact",
    "ratio_seed",
    "tiles_kept",
    "tiles_kept_oracle",
    "points_group_kept",
    "points_group_kept_oracle",
    "points_marked_lane",
    "buffer_mean",
    "buffer_max",
)


def group_counts(batch: dict, w: int, G: int, H: int, K: int) -> dict:
    """The counts of the module docstring for group w (queries w G, ..., w G + G - 1) of one
    morton_batch."""
    qs, ps, M, lam = batch["q"], batch["p"], batch["M"], batch["lam"]
    tlo, thi, tlam = batch["tlo"], batch["thi"], batch["tlam"]
    P = len(ps)
    qw = qs[w * G : (w + 1) * G]
    d = qw[:, None] - ps[None]
    D = torch.einsum("gpi,pij,gpj->gp", d, M, d)
    kth = D.kthvalue(K, dim=1).values
    mid = int(torch.searchsorted(batch["pc"], batch["qc"][w * G + G // 2]))
    start = max(0, min(mid - H // 2, P - H))
    window = D[:, start : start + H]
    seed = window.view(G, H // K, K).min(1).values.max(1).values
    out = {
        "ratio_exact": float((window.kthvalue(K, dim=1).values / kth).mean()),
        "ratio_seed": float((seed / kth).mean()),
    }
    lo, hi = qw.min(0).values, qw.max(0).values
    tile_points = torch.arange(len(tlo) * TILE).view(len(tlo), TILE)
    for suffix, gate in (("", seed), ("_oracle", kth)):
        kept = (box_bound(tlam, tlo, thi, qw) <= gate[:, None]).any(0)
        pts = tile_points[kept].flatten()
        gap = (lo - ps[pts]).clamp(min=0) + (ps[pts] - hi).clamp(min=0)
        group_kept = lam[pts] * (gap**2).sum(-1) <= gate.max()
        out["tiles_kept" + suffix] = int(kept.sum())
        out["points_group_kept" + suffix] = int(group_kept.sum())
        if not suffix:
            kept_pts = pts[group_kept]
            lane = lam[kept_pts][None] * (d[:, kept_pts] ** 2).sum(-1) <= gate[:, None]
            out["points_marked_lane"] = float(lane.sum(1).float().mean())
            buffer = (D <= gate[:, None]).sum(1)
            out["buffer_mean"] = float(buffer.float().mean())
            out["buffer_max"] = int(buffer.max())
    return out


def model(size: str, dist: str, G: int, H: int, groups: int) -> dict:
    """Counts averaged over ``groups`` groups spread over the first batch (buffer_max: the
    largest)."""
    _, Q, P, K = SIZES[size]
    q, p, sigma, R = inputs(dist, P, Q, batches=1, device="cpu")
    batch = morton_batch(q[0], p[0], sigma[0], R[0], TILE)
    rows = [group_counts(batch, w, G, H, K) for w in range(0, Q // G, max(1, Q // G // groups))]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in COUNTS if k != "buffer_max"}
    out["buffer_max"] = max(r["buffer_max"] for r in rows)
    return {"size": size, "dist": dist, "group": G, "window": H, "groups": len(rows), **out}


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {list(SIZES)}")
    ap.add_argument("--dist", default="cube", choices=("cube", "sphere"), help="the inputs")
    ap.add_argument("--group", type=int, default=32, help="queries a group")
    ap.add_argument("--window", type=int, default=128, help="points the seed is taken from")
    ap.add_argument("--groups", type=int, default=150, help="groups sampled a size")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown size '{s}', expected some of {list(SIZES)}")
        if args.window % SIZES[s][3] or args.window > SIZES[s][2]:
            ap.error(f"--window must be a multiple of K = {SIZES[s][3]} and at most P for '{s}'")
        if not 1 <= args.group <= SIZES[s][1]:
            ap.error(f"--group must be in [1, {SIZES[s][1]}] for '{s}'")
    if args.groups < 1:
        ap.error("--groups must be >= 1")
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    torch.set_num_threads(2)
    rows = []
    for s in sizes:
        rows.append(model(s, args.dist, args.group, args.window, args.groups))
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()})
    save_json(args.json, {"rows": rows}, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
