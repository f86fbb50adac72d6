"""A model of the cell search's work on the CPU (float64), and the per-point bound's floor.

For sampled queries of one batch it walks the Morton cells at the level with about 8 points a
cell (``--points-a-cell``), in rings around the query's cell, as the prototype kernel does: a
cell skipped when its smallest lam times the squared gap is above the query's K-th key so far,
the rings stopped when the batch's smallest lam times the gap to every unvisited cell is. It
counts per query, apart for the queries near the points and those farther than 0.1 from every
point: the in-grid cells of its rings (the kernel tests each of them, empty or not), the
non-empty cells tested, the cells and points scanned, the warp steps (a step a kept cell of up
to 32 points) and the list insertions. ``oracle_points`` counts, over all queries, the points
whose per-point bound lam |q - p|^2 is at or under the query's exact K-th distance: what any
walk with that bound must compute exactly (up to P = 16384: the all-pairs keys take minutes
beyond).

    python benchmarks/cell_search_prototype_h200/cell_walk_model.py model.json [--points-a-cell 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search_crossover import inputs  # noqa: E402
from tile_skip_model import metric  # noqa: E402

SIZES = {
    "reference": (12288, 4096, 16),
    "training size": (32768, 16384, 8),
    "P=65536": (12288, 65536, 16),
}


def oracle_points(q, p, M, lam, K: int) -> float:
    """Mean count per query of points with lam |q - p|^2 <= the exact K-th distance."""
    total = 0
    for s in range(0, len(q), 1024):
        d = q[s : s + 1024, None, :] - p[None]
        key = torch.einsum("pij,qpj,qpi->qp", M, d, d)
        kth = key.kthvalue(K, dim=1).values
        total += (lam[None] * (d * d).sum(-1) <= kth[:, None]).sum().item()
    return total / len(q)


def walk(x, p, M, lam, cells, clam, lo, size, n, K: int) -> dict:
    """One query's ring walk over the cells (see the module docstring)."""
    d = x - p
    key = torch.einsum("pij,pj,pi->p", M, d, d)
    qc = ((x - lo) / size).long().clamp(0, n - 1).tolist()
    lmin = lam.min().item()
    best: list[float] = []
    gate = math.inf
    out = dict(cells_enumerated=0, cells_tested=0, cells_scanned=0, points=0, steps=0, inserted=0)
    r = 0
    while True:
        for c in ring_cells(qc, r, n):
            out["cells_enumerated"] += 1
            if c not in cells:
                continue
            out["cells_tested"] += 1
            clo = lo + size * torch.tensor(c, dtype=torch.float64)
            gap = (torch.clamp(clo - x, min=0) + torch.clamp(x - clo - size, min=0)).pow(2).sum()
            if clam[c] * gap.item() > gate:
                continue
            v = cells[c]
            out["cells_scanned"] += 1
            out["points"] += len(v)
            out["steps"] += math.ceil(len(v) / 32)
            ks = key[v].tolist()
            out["inserted"] += sum(1 for k in ks if k < gate)
            best = sorted(best + ks)[:K]
            gate = best[-1] if len(best) == K else math.inf
        blo = lo + size * (torch.tensor(qc, dtype=torch.float64) - r)
        bhi = blo + size * (2 * r + 1)
        gaps = [(x[a] - blo[a]).item() for a in range(3) if qc[a] - r > 0]
        gaps += [(bhi[a] - x[a]).item() for a in range(3) if qc[a] + r < n - 1]
        if not gaps or lmin * max(0.0, min(gaps)) ** 2 > gate:
            return out
        r += 1


def ring_cells(qc: list[int], r: int, n: int):
    """The in-grid cells at Chebyshev distance r from qc."""
    rng = [range(max(0, c - r), min(n, c + r + 1)) for c in qc]
    for cx in rng[0]:
        for cy in rng[1]:
            for cz in rng[2]:
                if max(abs(cx - qc[0]), abs(cy - qc[1]), abs(cz - qc[2])) == r:
                    yield (cx, cy, cz)


def near_far_means(q: torch.Tensor, p: torch.Tensor, sample: int, walk_one) -> dict:
    """The mean of walk_one(i)'s counts (a dict) over ``sample`` queries of q (Q, 3) drawn with
    a fixed seed, apart for those within 0.1 of some point of p (P, 3) ("near_<count>") and the
    others ("far_<count>"), with each part's number of queries."""
    sel = torch.randint(0, len(q), (sample,), generator=torch.Generator().manual_seed(1)).tolist()
    far = {i: torch.cdist(q[i : i + 1], p).min().item() > 0.1 for i in sel}
    row: dict = {}
    for part in ("near", "far"):
        chosen = [i for i in sel if far[i] == (part == "far")]
        row[f"{part}_queries"] = len(chosen)
        tot: dict[str, float] = {}
        for i in chosen:
            for k, v in walk_one(i).items():
                tot[k] = tot.get(k, 0) + v / len(chosen)
        row.update({f"{part}_{k}": round(v, 1) for k, v in tot.items()})
    return row


def model(dist: str, Q: int, P: int, K: int, ppc: int, sample: int, oracle: bool) -> dict:
    q, p, sigma, R = (t[0].double() for t in inputs(dist, P, Q, batches=1, device="cpu"))
    M, lam = metric(sigma, R)
    lo, hi = p.min(0).values, p.max(0).values
    level = max(1, min(7, int(math.floor(math.log(P / ppc, 8) + 1e-9))))
    n = 2**level
    size = (hi - lo) / n
    pc = ((p - lo) / size).long().clamp(0, n - 1)
    cells: dict[tuple, list[int]] = {}
    for i, c in enumerate(map(tuple, pc.tolist())):
        cells.setdefault(c, []).append(i)
    clam = {c: lam[v].min().item() for c, v in cells.items()}
    row = {"dist": dist, "Q": Q, "P": P, "K": K, "level": level, "points_a_cell": P / 8**level}
    row.update(
        near_far_means(q, p, sample, lambda i: walk(q[i], p, M, lam, cells, clam, lo, size, n, K))
    )
    if oracle:
        row["oracle_points"] = round(oracle_points(q, p, M, lam, K), 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--points-a-cell", type=int, default=8)
    ap.add_argument("--sample", type=int, default=150, help="queries walked a row")
    args = ap.parse_args()
    rows = []
    for dist in ("cube", "sphere"):
        for name, (Q, P, K) in SIZES.items():
            # the oracle's all-pairs keys take minutes at P = 65536
            row = model(dist, Q, P, K, args.points_a_cell, args.sample, oracle=P <= 16384)
            row = {"size": name, **row}
            print(row, flush=True)
            rows.append(row)
    record = {"points_a_cell": args.points_a_cell, "sample": args.sample, "rows": rows}
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
