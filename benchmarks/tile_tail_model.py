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

And the hand-off the kernel does (``handoff_*`` columns; docs/op.md, "Handing long walks on"):
once the last group has started, a group hands on at a chunk it is about to visit when it has
scanned 32 tiles (64 where a batch has more than 512 tiles; looking again every 32) and 2 chunks
of the round, that one included, pass the chunk test against its widest gate; share x of the 8
then walks tiles x, x + 8, ... of each chunk from there on (share 0 with the group's lists,
the others empty under its gates), each share's scans counted as the group's are. The shares
run on the slots their groups' ends free, in the order they were handed on. Bookkeeping and
merges are not modelled. (``benchmarks/tile_tail_model.json`` was computed when the kernel
handed on after 64 tiles at every size.)

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
from tile_skip_model import CHUNK, morton_batch, outward_chunks, outward_walk  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402

SLOTS = 132 * 16
SPLIT_TILES, SPLIT_SHARES = 128, 8  # the split of long walks measured on the GPU (docs/op.md)
# (B, Q, P, K) of the op benchmark's sizes
SIZES = {
    "reference": (2, 12288, 4096, 16),
    "training": (1, 32768, 16384, 8),
    "P65536": (2, 12288, 65536, 16),
}


HANDOFF_RECHECK, HANDOFF_MIN_CHUNKS, HANDOFF_SHARES = 32, 2, 8  # the kernel's


def handoff_after_tiles(tiles: int) -> int:
    """Tiles a group scans before it may hand on, for a batch of ``tiles`` tiles (the kernel's
    ``handoff_after_tiles``)."""
    return 32 if tiles <= 512 else 64


class Walk:
    """One group's walk in the kernel's order: its scanned tiles (``scans``) and the points
    where it could hand on (``looks``: scanned tiles so far, the chunk position about to be
    visited, and the lists then), with what a share walk needs."""

    def __init__(self, batch: dict, w: int, group: int, K: int, tile: int, home: int):
        self.batch, self.K, self.tile = batch, K, tile
        self.qw, self.bound, order = outward_walk(batch, w, group, tile, home)
        nt = len(batch["tlo"])
        home_tiles = order[:home]
        self.chunks = outward_chunks(home_tiles[0] // CHUNK, (nt + CHUNK - 1) // CHUNK)
        self.chunk_tiles = [
            [t for t in range(c * CHUNK, min(nt, (c + 1) * CHUNK)) if t not in home_tiles]
            for c in self.chunks
        ]
        # each query's bound on each chunk's box (the union of its tiles' boxes)
        self.chunk_bound = torch.stack(
            [self.box_bound(c * CHUNK, min(nt, (c + 1) * CHUNK)) for c in self.chunks], 1
        )
        best = torch.full((len(self.qw), K), float("inf"), dtype=torch.float64)
        self.scans, best = self.scan(home_tiles, best, best[:, -1])
        self.looks = []
        next_look = handoff_after_tiles(nt)
        for pos, tiles in enumerate(self.chunk_tiles):
            if self.scans >= next_look:
                end = min(len(self.chunks), (pos // CHUNK + 1) * CHUNK)  # the round's end
                widest = best[:, -1].max()
                reach = int((self.chunk_bound[:, pos:end] <= widest).any(0).sum())
                if reach >= HANDOFF_MIN_CHUNKS:
                    self.looks.append((self.scans, pos, best.clone()))
                    next_look = self.scans + HANDOFF_RECHECK
            n, best = self.scan(tiles, best, best[:, -1])
            self.scans += n

    def box_bound(self, t0: int, t1: int) -> torch.Tensor:
        """Each query's bound on the box of tiles [t0, t1): smallest lam times squared gap."""
        lo = self.batch["tlo"][t0:t1].min(0).values
        hi = self.batch["thi"][t0:t1].max(0).values
        gap = (lo - self.qw).clamp(min=0) + (self.qw - hi).clamp(min=0)
        return self.batch["tlam"][t0:t1].min() * (gap**2).sum(-1)

    def scan(self, tiles, best, gate) -> tuple[int, torch.Tensor]:
        """Scans the tiles in order, each where some query's bound is under min(its gate, its
        list's last key); returns the scanned count and the lists."""
        n = 0
        for t in tiles:
            if not bool((self.bound[:, t] <= torch.minimum(gate, best[:, -1])).any()):
                continue
            n += 1
            cols = slice(t * self.tile, (t + 1) * self.tile)
            d = self.qw[:, None] - self.batch["p"][cols][None]
            D = torch.einsum("qpi,pij,qpj->qp", d, self.batch["M"][cols], d)
            best = torch.cat([best, D], 1).sort(1).values[:, : self.K]
        return n, best

    def shares(self, look: int) -> list[int]:
        """Scanned tiles of the 8 shares of a hand-off at looks[look]."""
        _, pos, best = self.looks[look]
        empty = torch.full_like(best, float("inf"))
        out = []
        for x in range(HANDOFF_SHARES):
            tiles = [
                t
                for c, ts in zip(self.chunks[pos:], self.chunk_tiles[pos:], strict=True)
                for t in ts
                if (t - c * CHUNK) % HANDOFF_SHARES == x
            ]
            out.append(self.scan(tiles, best if x == 0 else empty, best[:, -1])[0])
        return out


def group_walks(dist: str, B: int, Q: int, P: int, K: int, tile=32, home=8, seed=0) -> list[Walk]:
    """Every group's walk (see the module docstring), batch by batch."""
    lanes = 2 if P <= 4 * Q and B * Q >= 16384 else 4
    group = 32 // lanes
    q, p, sigma, R = inputs(dist, P, Q, batches=B, device="cpu", seed=seed)
    walks = []
    for b in range(B):
        batch = morton_batch(q[b], p[b], sigma[b], R[b], tile)
        walks += [Walk(batch, w, group, K, tile, home) for w in range(Q // group)]
    return walks


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


def handoff_span(walks: list[Walk], slots: int = SLOTS) -> tuple[float, int]:
    """Span with the kernel's hand-off (see the module docstring) and the number of walks
    handed on."""
    free = [(0.0, x) for x in range(slots)]
    starts, slot_of = [], []
    for wk in walks:  # the launch: every group in order, on the first free slot
        t, x = heapq.heappop(free)
        starts.append(t)
        slot_of.append(x)
        heapq.heappush(free, (t + wk.scans, x))
    all_started = max(starts)
    slot_free = [0.0] * slots
    shares, end, handed = [], 0.0, 0
    for wk, t0, x in zip(walks, starts, slot_of, strict=True):
        look = next((i for i, (n, _, _) in enumerate(wk.looks) if t0 + n >= all_started), None)
        if look is None:
            finish = t0 + wk.scans
        else:
            handed += 1
            at = t0 + wk.looks[look][0]
            costs = wk.shares(look)
            finish = at + costs[0]
            shares += [(at, c) for c in costs[1:]]
        slot_free[x] = max(slot_free[x], finish)
        end = max(end, finish)
    pool = list(slot_free)
    heapq.heapify(pool)
    for at, c in sorted(shares, key=lambda s: s[0]):
        start = max(heapq.heappop(pool), at)
        heapq.heappush(pool, start + c)
        end = max(end, start + c)
    return end, handed


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
            walks = group_walks(dist, B, Q, P, K)
            scans = [wk.scans for wk in walks]
            s = torch.tensor(scans, dtype=torch.float64)
            row = {"dist": dist, "size": name, "B": B, "Q": Q, "P": P, "K": K}
            row.update(groups=len(scans), p50=float(s.median()), p90=float(s.quantile(0.9)))
            row.update(max=float(s.max()), span=span(scans), balanced=float(s.sum()) / SLOTS)
            for cap in (128, len(scans)):
                after, concurrent = split_spans(scans, SPLIT_TILES, SPLIT_SHARES, cap)
                row[f"split_cap{cap}_second_launch"] = after
                row[f"split_cap{cap}_concurrent"] = concurrent
            row["handoff_span"], row["handoff_walks"] = handoff_span(walks)
            row["handoff_ratio"] = row["handoff_span"] / row["span"]
            rows.append(row)
            print(row, flush=True)
    write_json(args.json, {"slots": SLOTS, "rows": rows}, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
