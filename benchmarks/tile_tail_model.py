"""How unevenly the tile search's groups of queries work, and what that costs (a CPU model).

For every group of 32 / L consecutive queries (Morton order; L lanes a query as the CUDA kernel
picks it) counts the tiles of 32 points the group scans in the kernel's order (the 8 home tiles,
then the chunks of 32 tiles outward, a tile scanned when some query's bound on it is under that
query's gate; float64, exact keys), as ``tile_skip_model.py`` does. A group's time is taken as
proportional to its scanned tiles; list scheduling of the groups in launch order on
132 x 16 slots (an H100's SMs, 16 one-warp blocks each) gives the span, against the perfectly
balanced one (the sum over the slots). Where one group scans far more than the rest (queries
far from a surface, all points at a similar distance) the span is that group's time.

It also models splitting the long walks: the first 128 groups that scan more than 128 tiles
stop there and hand the rest on to 8 equal shares (with room for 128 groups, or for every
group), the shares run in a second launch after the first (as measured on the GPU, docs/op.md)
or as blocks dispatched after every group, each starting when its group hands on.

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
from tile_skip_model import morton_batch, outward_walk  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402

SLOTS = 132 * 16
SPLIT_TILES, SPLIT_SHARES = 128, 8  # the split of long walks measured on the GPU (docs/op.md)
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
        batch = morton_batch(q[b], p[b], sigma[b], R[b], tile)
        for w in range(Q // group):
            qw, bound, order = outward_walk(batch, w, group, tile, home)
            best = torch.full((group, K), float("inf"), dtype=torch.float64)
            n = 0
            for t in order:
                if not bool((bound[:, t] <= best[:, -1]).any()):
                    continue
                n += 1
                cols = slice(t * tile, (t + 1) * tile)
                d = qw[:, None] - batch["p"][cols][None]
                D = torch.einsum("qpi,pij,qpj->qp", d, batch["M"][cols], d)
                best = torch.cat([best, D], 1).sort(1).values[:, :K]
            scans.append(n)
    return scans


def span(costs: list[float], slots: int = SLOTS, release: list[float] | None = None) -> float:
    """Finish time of list scheduling the costs, in order, on ``slots`` identical slots; job i
    starts no earlier than release[i] (default 0)."""
    free = [0.0] * slots
    end = 0.0
    for i, c in enumerate(costs):
        start = max(heapq.heappop(free), release[i] if release else 0.0)
        heapq.heappush(free, start + c)
        end = max(end, start + c)
    return end


def split_spans(costs: list[int], tiles: int, shares: int, cap: int) -> tuple[float, float]:
    """Spans when the first ``cap`` groups (in launch order) that scan more than ``tiles``
    tiles stop there and hand the rest on to ``shares`` jobs of equal parts: (the shares in a
    second launch after the first, the shares as blocks dispatched after every group and
    starting when their group hands on)."""
    first, rest, handed_at = [], [], []
    for c in costs:
        if c > tiles and len(rest) < cap:
            first.append(tiles)
            rest.append(c - tiles)
        else:
            first.append(c)
    after = span(first) + span([r / shares for r in rest for _ in range(shares)])
    # when each split group hands on: simulate the first launch alone, recording start times
    free = [0.0] * SLOTS
    for c, f in zip(costs, first, strict=True):
        start = heapq.heappop(free)
        heapq.heappush(free, start + f)
        if f < c:
            handed_at.append(start + f)
    jobs = first + [r / shares for r in rest for _ in range(shares)]
    release = [0.0] * len(first) + [t for t in handed_at for _ in range(shares)]
    return after, span(jobs, release=release)


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
            for cap in (128, len(scans)):
                after, concurrent = split_spans(scans, SPLIT_TILES, SPLIT_SHARES, cap)
                row[f"split_cap{cap}_second_launch"] = after
                row[f"split_cap{cap}_concurrent"] = concurrent
            rows.append(row)
            print(row, flush=True)
    write_json(args.json, {"slots": SLOTS, "rows": rows}, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
