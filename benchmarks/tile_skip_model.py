"""How much of the brute-force search a warp-by-tile skip would keep (a model on the CPU).

A design for the CUDA search that the op benchmark's bars call for (docs/op.md): sort the
queries and the points along a Morton curve, let a warp own 32 consecutive queries, cut the
points into tiles of T consecutive points, and let the warp skip a tile when every lane's
lower bound on the tile's distances is above that lane's current K-th best distance (the bound
is the grid's: the tile's smallest eigenvalue bound lam times the squared gap between the
query and the tile's bounding box). Whatever the warp does not skip, it scans like today's
brute force, so the kept fraction of (warp, tile) pairs estimates the kept fraction of the
brute force's work.

This script computes that fraction exactly (float64) on the op benchmark's inputs
(``neusdf.ops.testing.make_inputs``) for these visiting orders:

- ``sorted``: each warp visits the tiles in ascending order of its smallest bound and stops
  once that bound exceeds every lane's gate (the best order; a kernel would need a per-warp
  sort of the tile bounds);
- ``home``: each warp first scans the H tiles around where its queries fall in the points'
  Morton order, then every other tile in index order with the skip test (no sort);
- ``outward``: the home tiles, then the chunks of 32 tiles outward from the home tiles' chunk
  (c, c + 1, c - 1, c + 2, ...; the CUDA kernel's order from the nineteenth to the
  twenty-fourth session), each chunk's tiles in index order;
- ``outward-start``: as ``outward``, but the home tiles from the one where the group's middle
  query falls, upward, then wrapping to the first (``home_start``: the CUDA kernel's order
  since the twenty-fifth session);
- ``chunks-sorted``: the home tiles, then the chunks in ascending order of the group's smallest
  bound on them (the chunk's box and smallest lam; a kernel would sort P / 1024 keys a warp);
- ``oracle``: every lane's gate is its exact K-th distance from the start, so a tile is kept
  exactly when the bound does not rule it out for some lane at the end of the search: the
  least any visiting order can keep with this bound (a kernel cannot know these gates).

In every order but ``oracle`` the gates start at +inf and tighten as tiles are scanned, as they
would in a kernel, and ``<order>_inserted`` counts the points a query's list takes (a key below
its K-th at the time), per query: the list insertions, which the visiting order changes.

``--dist sphere`` takes ``search_crossover.py``'s sphere (``inputs``, on the CPU): the points
projected on the unit sphere and 70% of the queries drawn near them (normal noise of 0.05), a
surface like a shape's neural points.

``--group G`` lets G consecutive queries walk the tiles together instead of 32 (a design
question: the tiles a group scans are the union of what its queries need, which
``<order>_points_per_query`` measures as the points each query scans).

``--lam-classes C`` (``oracle`` only) orders the points by the class of their lam (C classes
of equal count, smallest lam first) and along the Morton curve inside a class, so that a
tile's smallest lam bounds points of similar lam.

For the ``home`` and ``oracle`` orders it also counts ``<order>_points_marked``: the fraction
of a scanned tile's points whose per-point bound (lam |q - p|^2, the tile kernel's prefilter)
is at or under some lane's gate when the tile starts, i.e. the points whose exact distance the
kernel computes.

    python benchmarks/tile_skip_model.py results.json
    python benchmarks/tile_skip_model.py results.json --sizes reference --tile 64
    python benchmarks/tile_skip_model.py results.json --orders oracle --lam-classes 4
    python benchmarks/tile_skip_model.py results.json --orders oracle --group 8 --tile 16
    python benchmarks/tile_skip_model.py results.json --orders home,outward,chunks-sorted \
        --dist sphere --group 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neusdf.mesh_io import save_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import inputs  # noqa: E402

# the op benchmark's sizes (B, Q, P, K); every group of every batch is computed
SIZES = {
    "reference": (2, 12288, 4096, 16),
    "P=65536": (2, 12288, 65536, 16),
    "training size": (1, 32768, 16384, 8),
}
ORDERS = ("sorted", "home", "outward", "outward-start", "chunks-sorted", "oracle")
CHUNK = 32  # tiles a chunk (the CUDA kernel's)
MORTON_BITS = 10


def morton(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(N,) int64 Morton codes of (N, 3) points in the box [lo, hi] (MORTON_BITS per axis)."""
    cell = ((x - lo) / (hi - lo + 1e-12) * (2**MORTON_BITS - 1)).long()
    code = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for bit in range(MORTON_BITS):
        for axis in range(3):
            code |= ((cell[:, axis] >> bit) & 1) << (3 * bit + axis)
    return code


def outward_chunks(hc: int, chunks: int) -> list[int]:
    """The chunks [0, chunks) outward from hc: hc, hc + 1, hc - 1, hc + 2, ... (the CUDA
    kernel's ``outward_chunk``)."""
    order = [hc]
    for k in range(1, chunks):
        order += [c for c in (hc + k, hc - k) if 0 <= c < chunks]
    return order


def metric(sigma: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = R^T diag(sigma) R (P, 3, 3) and its smallest eigenvalue lam (P,), in float64."""
    M = R.double().transpose(1, 2) @ torch.diag_embed(sigma.double()) @ R.double()
    return M, torch.linalg.eigvalsh(M)[:, 0].contiguous()


def box_bound(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor):
    """(G, n): lam (n,) times the squared gap between each of x (G, 3) and each box [lo, hi]
    (n, 3): the search's lower bound on a box's distances."""
    gap = (lo[None] - x[:, None]).clamp(min=0) + (x[:, None] - hi[None]).clamp(min=0)
    return lam[None] * (gap**2).sum(-1)


def chunk_boxes(tlo: torch.Tensor, thi: torch.Tensor, tlam: torch.Tensor):
    """The boxes (chunks, 3) twice and smallest lam (chunks,) of each CHUNK consecutive tiles."""
    parts = [slice(c, c + CHUNK) for c in range(0, len(tlo), CHUNK)]
    return (
        torch.stack([tlo[s].min(0).values for s in parts]),
        torch.stack([thi[s].max(0).values for s in parts]),
        torch.stack([tlam[s].min() for s in parts]),
    )


def morton_batch(q, p, sigma, R, tile: int = 32, lam_classes: int = 1) -> dict:
    """One batch's queries (Q, 3) and points (P, 3) sorted along one Morton curve over both, in
    float64: "q", "qc" (their codes), "qo" (the order: q[qo]), "p", "pc", "po", "sigma", "R" (in
    the points' order), "M"
    (P, 3, 3), "lam" (P,), M's smallest eigenvalue, and the boxes of the P // tile whole tiles,
    "tlo", "thi" (tiles, 3), with "tlam" (tiles,), their smallest lam. lam_classes > 1 sorts the
    points by lam's quantile class first, then along the curve (``--lam-classes``)."""
    qb, pb = q.double(), p.double()
    both = torch.cat([qb, pb])
    lo, hi = both.min(0).values, both.max(0).values
    qc, pc = morton(qb, lo, hi), morton(pb, lo, hi)
    M, lam = metric(sigma, R)
    rank = torch.zeros(len(pb), dtype=torch.long)
    if lam_classes > 1:
        cuts = torch.quantile(lam, torch.linspace(0, 1, lam_classes + 1)[1:-1].double())
        rank = torch.bucketize(lam, cuts)
    qo, po = torch.argsort(qc), torch.argsort(rank * 2 ** (3 * MORTON_BITS) + pc)
    nt = len(pb) // tile
    pts = pb[po][: nt * tile].view(nt, tile, 3)
    out = {"q": qb[qo], "qc": qc[qo], "p": pb[po], "pc": pc[po], "M": M[po], "lam": lam[po]}
    out.update(qo=qo, po=po)
    out.update(sigma=sigma.double()[po], R=R.double()[po])
    out.update(tlo=pts.min(1).values, thi=pts.max(1).values)
    out["tlam"] = out["lam"][: nt * tile].view(nt, tile).min(1).values
    return out


def outward_walk(batch: dict, w: int, group: int, tile: int = 32, home: int = 8):
    """Group w's queries (group, 3) of a morton_batch, each query's bound on each tile
    (group, tiles: the tile's smallest lam times the squared gap to its box), and the tiles in the
    CUDA kernel's order: the home tiles around where the group's middle query falls among the
    points, then the chunks outward (``outward_chunks``)."""
    qw = batch["q"][w * group : (w + 1) * group]
    tlo, thi = batch["tlo"], batch["thi"]
    bound = box_bound(batch["tlam"], tlo, thi, qw)
    nt = len(tlo)
    start = int(torch.searchsorted(batch["pc"], batch["qc"][w * group + group // 2])) // tile
    first = max(0, min(start - home // 2, nt - home))
    order = list(range(first, first + home)) + [
        t
        for c in outward_chunks(first // CHUNK, (nt + CHUNK - 1) // CHUNK)
        for t in range(c * CHUNK, min(nt, (c + 1) * CHUNK))
        if not first <= t < first + home
    ]
    return qw, bound, order


def kept_fraction(
    B: int,
    Q: int,
    P: int,
    K: int,
    tile: int,
    home: int,
    orders,
    lam_classes=1,
    seed=0,
    group=32,
    dist="cube",
) -> dict:
    """Fraction of (group, tile) pairs scanned under each of ``orders``, over all batches;
    ``<order>_points_per_query``, the points a query scans (its group's scanned tiles times
    their points); ``<order>_points_marked`` for all but sorted and ``<order>_inserted`` for all
    but oracle (see the module docstring).
    ``group``: queries walking the tiles together (the CUDA tile kernel walks 16 or 8, giving a
    query 2 or 4 lanes; the block-of-32 kernel before it, which the recorded numbers model, 32)."""
    q, p, sigma, R = inputs(dist, P, Q, batches=B, device="cpu", seed=seed)
    scanned = dict.fromkeys(orders, 0)
    marked = dict.fromkeys(orders, 0)
    inserted = dict.fromkeys(orders, 0)
    total = 0
    queries = 0
    for b in range(B):
        batch = morton_batch(q[b], p[b], sigma[b], R[b], tile, lam_classes)
        qb, qc, pb, pc, M, lam = (batch[k] for k in ("q", "qc", "p", "pc", "M", "lam"))
        tlo, thi, tlam = batch["tlo"], batch["thi"], batch["tlam"]
        nt = P // tile
        nc = (nt + CHUNK - 1) // CHUNK
        clo, chi, clam = chunk_boxes(tlo, thi, tlam)
        for w in range(Q // group):
            qw = qb[w * group : (w + 1) * group]
            queries += group
            bound = box_bound(tlam, tlo, thi, qw)  # (group, tiles)
            visits = {}
            if "sorted" in orders:
                visits["sorted"] = torch.argsort(bound.min(0).values).tolist()
            start = int(torch.searchsorted(pc, qc[w * group + group // 2])) // tile
            first = max(0, min(start - home // 2, nt - home))
            homes = list(range(first, first + home))
            if "home" in orders:
                visits["home"] = homes + [t for t in range(nt) if not first <= t < first + home]
            at = min(max(start - first, 0), home - 1)  # home_start
            homes_from_start = homes[at:] + homes[:at]
            chunk_orders = {}
            for name in ("outward", "outward-start"):
                if name in orders:
                    chunk_orders[name] = outward_chunks(first // CHUNK, nc)
            if "chunks-sorted" in orders:
                cbound = box_bound(clam, clo, chi, qw).min(0).values  # (chunks,)
                chunk_orders["chunks-sorted"] = torch.argsort(cbound, stable=True).tolist()
            for name, chunk_order in chunk_orders.items():
                visits[name] = (homes_from_start if name == "outward-start" else homes) + [
                    t
                    for c in chunk_order
                    for t in range(c * CHUNK, min(nt, (c + 1) * CHUNK))
                    if not first <= t < first + home
                ]
            final = None
            if "oracle" in orders:
                d = qw[:, None, :] - pb[None]
                final = torch.einsum("qpi,pij,qpj->qp", d, M, d).sort(1).values[:, K - 1]
                visits["oracle"] = range(nt)
            for name, order in visits.items():
                best = torch.full((group, K), float("inf"), dtype=torch.float64)
                for t in order:
                    gate = final if name == "oracle" else best[:, -1]
                    if name == "sorted" and bool(bound[:, t].min() > gate.max()):
                        break  # the tiles left are farther still for every lane
                    if not bool((bound[:, t] <= gate).any()):
                        continue
                    scanned[name] += 1
                    sl = slice(t * tile, (t + 1) * tile)
                    d = qw[:, None, :] - pb[sl][None]
                    if name != "sorted":
                        under = lam[sl][None] * (d**2).sum(-1) <= gate[:, None]  # (group, T)
                        marked[name] += int(under.any(0).sum())
                    if name != "oracle":
                        D = torch.einsum("qpi,pij,qpj->qp", d, M[sl], d)
                        inserted[name] += int((D < gate[:, None]).sum())
                        best = torch.cat([best, D], 1).sort(1).values[:, :K]
            total += nt
    kept = {name: scanned[name] / total for name in orders}
    for name in orders:
        kept[f"{name}_points_per_query"] = scanned[name] * tile * group / queries
        if name != "sorted":
            kept[f"{name}_points_marked"] = marked[name] / max(scanned[name] * tile, 1)
        if name != "oracle":
            kept[f"{name}_inserted"] = inserted[name] / queries
    return kept


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="output JSON")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {list(SIZES)}")
    ap.add_argument("--tile", type=int, default=32, help="points per tile")
    ap.add_argument("--home", type=int, default=8, help="tiles scanned first in 'home' order")
    ap.add_argument("--group", type=int, default=32, help="queries walking the tiles together")
    ap.add_argument("--orders", default=",".join(ORDERS), help=f"comma list of {list(ORDERS)}")
    ap.add_argument(
        "--lam-classes", type=int, default=1, help="points ordered by lam class first (oracle)"
    )
    ap.add_argument("--dist", default="cube", choices=("cube", "sphere"), help="the inputs")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args()
    orders = [o for o in args.orders.split(",") if o]
    if not orders or any(o not in ORDERS for o in orders):
        ap.error(f"--orders: expected a comma list of {list(ORDERS)}, got '{args.orders}'")
    if args.lam_classes < 1:
        ap.error(f"--lam-classes must be >= 1, got {args.lam_classes}")
    if args.lam_classes > 1 and orders != ["oracle"]:
        ap.error("--lam-classes > 1 needs --orders oracle (the other orders assume Morton order)")
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown size '{s}', expected some of {list(SIZES)}")
        if args.group > SIZES[s][1]:
            ap.error(f"--group {args.group} exceeds the {SIZES[s][1]} queries of '{s}'")
    if args.tile < 1 or args.home < 1 or args.group < 1:
        ap.error("--tile, --home and --group must be >= 1")
    rows = []
    for s in sizes:
        B, Q, P, K = SIZES[s]
        t0 = time.perf_counter()
        kept = kept_fraction(
            B,
            Q,
            P,
            K,
            args.tile,
            args.home,
            orders,
            lam_classes=args.lam_classes,
            group=args.group,
            dist=args.dist,
        )
        rows.append({"size": s, "B": B, "Q": Q, "P": P, "K": K, **kept})
        print(
            f"{s:14s} (B={B}, Q={Q}, P={P}, K={K}), tiles of {args.tile}, groups of "
            f"{args.group}: kept "
            + ", ".join(f"{o} {kept[o]:.3f}" for o in orders)
            + "; points per query "
            + ", ".join(f"{o} {kept[o + '_points_per_query']:.0f}" for o in orders)
            + "".join(
                f"; points marked in {o}'s scanned tiles {kept[o + '_points_marked']:.3f}"
                for o in orders
                if o != "sorted"
            )
            + "".join(
                f"; {o} inserts {kept[o + '_inserted']:.1f} a query"
                for o in orders
                if o != "oracle"
            )
            + f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    result = {
        "tile": args.tile,
        "home": args.home,
        "group": args.group,
        "lam_classes": args.lam_classes,
        "dist": args.dist,
        "rows": rows,
    }
    save_json(args.json, result, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
