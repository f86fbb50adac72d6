"""A model of a warp a query walking the tile search's tiles best-first (the CPU, float64).

The tile build's tiles (32 points consecutive in Morton order) and chunks (32 tiles) as a
two-level hierarchy of boxes, walked by each query alone, as a warp a query would: the chunks
in ascending order of their bound (the chunk's smallest lam times the squared gap to its box),
stopping at the first above the query's K-th key so far; in each chunk, its tiles in ascending
order of their bound, stopping likewise; every point of a scanned tile whose per-point bound
lam |q - p|^2 is at or under the K-th key gets its exact key. Counted per sampled query, apart
for the queries near the points and those farther than 0.1 from every point: the chunks and
tiles scanned, the exact keys and the list insertions (keys below the K-th at the time).

    python benchmarks/cell_search_prototype_h200/tile_walk_model.py model.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cell_walk_model import near_far_means  # noqa: E402
from search_crossover import inputs  # noqa: E402
from tile_skip_model import CHUNK, box_bound, chunk_boxes, morton_batch  # noqa: E402

SIZES = {
    "reference": (12288, 4096, 16),
    "training size": (32768, 16384, 8),
    "P=65536": (12288, 65536, 16),
}


def walk(x, pb, M, lam, tiles, chunks, K: int) -> dict:
    """One query's best-first walk (see the module docstring)."""
    (tlo, thi, tlam), (clo, chi, clam) = tiles, chunks
    cb, tb = box_bound(clam, clo, chi, x[None])[0], box_bound(tlam, tlo, thi, x[None])[0]
    d = x - pb
    key = torch.einsum("pi,pij,pj->p", d, M, d)
    pre = lam * (d * d).sum(-1)
    best: list[float] = []
    gate = math.inf
    out = dict(chunks=0, tiles=0, keys=0, inserted=0)
    for c in torch.argsort(cb).tolist():
        if cb[c] > gate:
            break
        out["chunks"] += 1
        ts = range(c * CHUNK, min(len(tlo), (c + 1) * CHUNK))
        for t in sorted(ts, key=lambda t: tb[t].item()):
            if tb[t] > gate:
                break
            out["tiles"] += 1
            sl = slice(t * 32, (t + 1) * 32)
            ks = key[sl][pre[sl] <= gate].tolist()
            out["keys"] += len(ks)
            out["inserted"] += sum(1 for k in ks if k < gate)
            best = sorted(best + ks)[:K]
            gate = best[-1] if len(best) == K else math.inf
    return out


def model(dist: str, Q: int, P: int, K: int, sample: int) -> dict:
    q, p, sigma, R = (t[0] for t in inputs(dist, P, Q, batches=1, device="cpu"))
    bt = morton_batch(q, p, sigma, R, 32)
    tlo, thi, tlam = bt["tlo"], bt["thi"], bt["tlam"]
    chunks = chunk_boxes(tlo, thi, tlam)
    row: dict = {"dist": dist, "Q": Q, "P": P, "K": K, "chunks": len(chunks[2])}
    tiles = (tlo, thi, tlam)

    def walk_one(i: int) -> dict:
        return walk(bt["q"][i], bt["p"], bt["M"], bt["lam"], tiles, chunks, K)

    row.update(near_far_means(bt["q"], bt["p"], sample, walk_one))
    return row


def main() -> int:
    rows = []
    for dist in ("cube", "sphere"):
        for name, (Q, P, K) in SIZES.items():
            row = {"size": name, **model(dist, Q, P, K, sample=200)}
            print(row, flush=True)
            rows.append(row)
    Path(sys.argv[1]).write_text(json.dumps({"sample": 200, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
