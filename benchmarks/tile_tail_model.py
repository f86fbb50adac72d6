"""How unevenly the tile search's groups of queries work, and what that costs (a CPU model).

For every group of 32 / L consecutive queries (Morton order; L lanes a query as the CUDA kernel
picks it) counts the tiles of 32 points the group scans in the kernel's order (the 8 home tiles,
then the chunks of 32 tiles outward, a tile scanned when some query's bound on it is under that
query's gate; float64, exact keys), as ``tile_skip_model.py`` does. A group's time is taken as
proportional to its scanned tiles; list scheduling of the groups in launch order on
132 x 16 slots (an H100's SMs, 16 one-warp blocks each) gives the span, against the perfectly
balanced one (the sum over the slots). Where one group scans far more than the rest (queries
far from a surface, all points at a similar distance) the span is that group's time.

    python benchmarks/tile_tail_model.py tile_tail_model.json
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import inputs  # noqa: E402
from tile_skip_model import CHUNK, morton, outward_chunks  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402

SLOTS = 132 * 16
# (B, Q, P, K) of the op benchmark's sizes
SIZES = {
    "reference": (2, 12288, 4096, 16),
    "training": (1, 32768, 16384, 8),
    "P65536": (2, 12288, 65536, 16),
}


def group_scans(dist: str, B: int, Q: int, P: int, K: int, tile=32, home=8, seed=0) -> list[int]:
    """Scanned tiles of every group (see the module docstring), batch by batch."""
    lanes = 2 if P <= 4 * Q and B * Q >= 16384 else 4
    group = 32 // lanes
    q, p, sigma, R = inputs(dist, P, Q, batches=B, device="cpu", seed=seed)
    scans = []
    for b in range(B):
        qb, pb = q[b].double(), p[b].double()
        both = torch.cat([qb, pb])
        lo, hi = both.min(0).values, both.max(0).values
        qc, pc = morton(qb, lo, hi), morton(pb, lo, hi)
        qo, po = torch.argsort(qc), torch.argsort(pc)
        qb, qc, pb, pc = qb[qo], qc[qo], pb[po], pc[po]
        Rb, sb = R[b].double()[po], sigma[b].double()[po]
        M = Rb.transpose(1, 2) @ torch.diag_embed(sb) @ Rb
        lam = torch.linalg.eigvalsh(M)[:, 0]
        nt = P // tile
        pts = pb[: nt * tile].view(nt, tile, 3)
        tlo, thi = pts.min(1).values, pts.max(1).values
        tlam = lam[: nt * tile].view(nt, tile).min(1).values
        nc = (nt + CHUNK - 1) // CHUNK
        for w in range(Q // group):
            qw = qb[w * group : (w + 1) * group]
            gap = (tlo[None] - qw[:, None]).clamp(min=0) + (qw[:, None] - thi[None]).clamp(min=0)
            bound = tlam[None] * (gap**2).sum(-1)
            start = int(torch.searchsorted(pc, qc[w * group + group // 2])) // tile
            first = max(0, min(start - home // 2, nt - home))
            order = list(range(first, first + home)) + [
                t
                for c in outward_chunks(first // CHUNK, nc)
                for t in range(c * CHUNK, min(nt, (c + 1) * CHUNK))
                if not first <= t < first + home
            ]
            best = torch.full((group, K), float("inf"), dtype=torch.float64)
            n = 0
            for t in order:
                if not bool((bound[:, t] <= best[:, -1]).any()):
                    continue
                n += 1
                cols = slice(t * tile, (t + 1) * tile)
                d = qw[:, None] - pb[cols][None]
                D = torch.einsum("qpi,pij,qpj->qp", d, M[cols], d)
                best = torch.cat([best, D], 1).sort(1).values[:, :K]
            scans.append(n)
    return scans


def span(costs: list[float], slots: int = SLOTS) -> float:
    """Finish time of list scheduling the costs, in order, on ``slots`` identical slots."""
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args(argv)
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    rows = []
    for dist in ("cube", "sphere"):
        for name, (B, Q, P, K) in SIZES.items():
            scans = group_scans(dist, B, Q, P, K)
            s = torch.tensor(scans, dtype=torch.float64)
            row = {"dist": dist, "size": name, "B": B, "Q": Q, "P": P, "K": K}
            row.update(groups=len(scans), p50=float(s.median()), p90=float(s.quantile(0.9)))
            row.update(max=float(s.max()), span=span(scans), balanced=float(s.sum()) / SLOTS)
            rows.append(row)
            print(row, flush=True)
    write_json(args.json, {"slots": SLOTS, "rows": rows}, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
