"""How many tiles each group of the tile search scans, in six visiting orders (a CPU model).

For every group of 16 consecutive queries (Morton order; 2 lanes a query, as the CUDA kernel
runs the op benchmark's reference and training sizes) counts the tiles of 32 points it scans,
exactly, in float64 (``tile_skip_model.py``'s batches and bounds: a tile's smallest lam times
the squared gap to its box, against each query's running K-th key):

- ``planned``: the CUDA kernel's order and planning: the 8 home tiles, then the chunks of 32
  tiles outward; a chunk's tiles are chosen with the gates at the chunk's start (the per-query
  tile test) and all of them are scanned, in index order (the home tiles too: the kernel
  starts them at the middle query's tile, which changes no count here, where all 8 are
  scanned, but may change the re-tested orders' counts a little);
- ``retest``: the same, each chosen tile tested again with the gates when it comes;
- ``retest-nearest``: the same, a chunk's chosen tiles in ascending order of the group's bound
  (the smallest over its queries);
- ``sorted``: every tile of the batch in ascending order of the group's bound, each tested when
  it comes (no chunks, no home tiles);
- ``home-sorted``: the home tiles as ``planned``, then the batch's other tiles whose bound is
  not above the widest gate after them, in ascending order of the group's bound, 32 at a time,
  chosen with the gates at each set's start (the CUDA variant of docs/op.md, "The other tiles
  nearest first after the home tiles").
- ``home-fixed``: the home tiles as ``planned``, then every other tile of the batch that some
  query's bound keeps under its gate after the home tiles, that gate held fixed (no re-test):
  the (group, tile) work items of a design that would scan them in any order, on any warp,
  and collect each query's points under its fixed gate in a buffer (docs/op.md, "A balanced
  scan after the home tiles"). Each row also has ``home_fixed_buffer``: the points whose exact
  key is at or under a query's fixed gate (the buffer it needs).

Also the correlation of a group's ``planned`` scans with the diagonal of its queries' box.
Times are not modelled: a scan's cost depends on the points it marks (docs/op.md, "Where the
warps wait at the small sizes").

    python benchmarks/tile_order_model.py tile_order_model.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import inputs  # noqa: E402
from tile_skip_model import CHUNK, morton_batch, outward_chunks, outward_walk  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402

SIZES = {"reference": (2, 12288, 4096, 16), "training": (1, 32768, 16384, 8)}
ORDERS = ("planned", "retest", "retest-nearest", "sorted", "home-sorted", "home-fixed")
GROUP, TILE, HOME = 16, 32, 8


def group_scans(batch: dict, w: int, K: int) -> tuple[dict[str, int], float, torch.Tensor]:
    """Group w's scanned tiles in each of ORDERS, the diagonal of its queries' box, and each
    query's points at or under its gate after the home tiles ((group,) int64)."""
    qw, bound, kernel_order = outward_walk(batch, w, GROUP, TILE, HOME)
    nt = bound.shape[1]
    homes = kernel_order[:HOME]  # outward_walk's order starts with the home tiles
    chunks = [homes] + [
        [t for t in range(c * CHUNK, min(nt, (c + 1) * CHUNK)) if t not in homes]
        for c in outward_chunks(homes[0] // CHUNK, (nt + CHUNK - 1) // CHUNK)
    ]
    nearest = bound.min(0).values  # the group's bound on each tile

    def keys(cols: slice) -> torch.Tensor:
        """The group's exact keys (group, points) on the points cols."""
        d = qw[:, None] - batch["p"][cols][None]
        return torch.einsum("qpi,pij,qpj->qp", d, batch["M"][cols], d)

    def scan(t: int, best: torch.Tensor) -> torch.Tensor:
        D = keys(slice(t * TILE, (t + 1) * TILE))
        return torch.cat([best, D], 1).sort(1).values[:, :K]

    def needed(t: int, best: torch.Tensor) -> bool:
        return bool((bound[:, t] <= best[:, -1]).any())

    def scan_needed(tiles: list[int], best: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Scans the tiles some query needs under the gates at the start (a planned set)."""
        todo = [t for t in tiles if needed(t, best)]
        for t in todo:
            best = scan(t, best)
        return best, len(todo)

    out = {}
    for order in ("planned", "retest", "retest-nearest", "sorted"):
        best = torch.full((len(qw), K), float("inf"), dtype=torch.float64)
        n = 0
        plans = [list(range(nt))] if order == "sorted" else chunks
        for tiles in plans:
            todo = tiles if order == "sorted" else [t for t in tiles if needed(t, best)]
            if order in ("retest-nearest", "sorted"):
                todo = sorted(todo, key=lambda t: float(nearest[t]))
            for t in todo:
                if order != "planned" and not needed(t, best):
                    continue
                best = scan(t, best)
                n += 1
        out[order] = n
    best, n = scan_needed(homes, torch.full((len(qw), K), float("inf"), dtype=torch.float64))
    fixed = best[:, -1:]
    out["home-fixed"] = n + sum(1 for t in range(nt) if t not in homes and needed(t, best))
    buffer = (keys(slice(None)) <= fixed).sum(1)
    widest = best[:, -1].max()
    rest = sorted(
        (t for t in range(nt) if t not in homes and nearest[t] <= widest),
        key=lambda t: float(nearest[t]),
    )
    for i in range(0, len(rest), CHUNK):
        best, m = scan_needed(rest[i : i + CHUNK], best)
        n += m
    out["home-sorted"] = n
    diagonal = float((qw.max(0).values - qw.min(0).values).norm())
    return out, diagonal, buffer


def summary(s: torch.Tensor) -> dict[str, float]:
    """Mean, median, 90th and 99th percentiles and largest of a float64 vector."""
    return {
        "mean": float(s.mean()),
        "p50": float(s.median()),
        "p90": float(s.quantile(0.9)),
        "p99": float(s.quantile(0.99)),
        "max": float(s.max()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {list(SIZES)}")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args(argv)
    sizes = args.sizes.split(",")
    if bad := [s for s in sizes if s not in SIZES]:
        ap.error(f"--sizes: unknown {bad}; expected some of {list(SIZES)}")
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    rows = []
    for dist in ("cube", "sphere"):
        for name in sizes:
            B, Q, P, K = SIZES[name]
            q, p, sigma, R = inputs(dist, P, Q, batches=B, device="cpu")
            scans = {o: [] for o in ORDERS}
            diagonals, buffers = [], []
            for b in range(B):
                batch = morton_batch(q[b], p[b], sigma[b], R[b], TILE)
                for w in range(Q // GROUP):
                    counts, diagonal, buffer = group_scans(batch, w, K)
                    for o in ORDERS:
                        scans[o].append(counts[o])
                    diagonals.append(diagonal)
                    buffers.append(buffer)
            row = {"dist": dist, "size": name, "B": B, "Q": Q, "P": P, "K": K}
            for o in ORDERS:
                row[o] = summary(torch.tensor(scans[o], dtype=torch.float64))
            row["home_fixed_buffer"] = summary(torch.cat(buffers).double())
            pairs = torch.tensor([scans["planned"], diagonals], dtype=torch.float64)
            row["corr_planned_scans_diagonal"] = float(torch.corrcoef(pairs)[0, 1])
            row["median_diagonal"] = float(torch.tensor(diagonals).median())
            rows.append(row)
            print(row, flush=True)
    write_json(
        args.json,
        {"group": GROUP, "tile": TILE, "home": HOME, "rows": rows},
        overwrite=args.overwrite,
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
