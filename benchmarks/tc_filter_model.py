"""What a tensor-core lower bound on the search key would save, counted on the CPU (a model).

The key D = (q - p)^T M (q - p), M = R^T diag(sigma) R, expands into a dot product of a
per-query and a per-point vector of 10 terms, a(q) = (x^2, y^2, z^2, xy, xz, yz, x, y, z, 1)
and b(p) = (M00, M11, M22, 2 M01, 2 M02, 2 M12, -2 (M p), p^T M p), so one matrix product
gives every pair's key. In TF32 (10 mantissa bits, truncated here: the worst case) a sound lower
bound is the product minus c 2^-10 |a|_1 max_i |b|_i, c = 4, with |b| built from |R| (the
rounding of the inputs and the cancellation of the expansion). Two counts, float64:

- ``tile``: in the tile search's order (Morton-sorted points and queries, groups of 16 queries,
  the 8 home tiles then the chunks outward; docs/op.md), per query, the points of the scanned
  tiles that would get an exact key under today's isotropic bound lam |q - p|^2 (``iso``),
  under the TF32 bound (``tf32``), under a bound as tight as the key (``exact``: the points at
  or under the gate, the least any filter can pass), all against the gate at the tile's start;
- ``brute``: a brute force in the points' index order with the TF32 bound, a warp of 8 queries
  with 4 lanes each (lane t keeps the points with index mod 8 in {2t, 2t + 1}, as an mma
  fragment gives them), the query's gate the N-th key of its 4 lists after each round of 32
  points: exact keys and insertions per query, and the warp's lockstep steps (per round, the
  longest lane's exact keys; for insertions through queues of 8, the longest queue per merge).

    python benchmarks/tc_filter_model.py tc_filter_model.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import inputs  # noqa: E402
from tile_skip_model import morton_batch, outward_walk  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402

SLACK = 4.0  # c: the bound's error term in units of 2^-10 |a|_1 max |b|


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 by truncation (float64 in, float64 out)."""
    bits = x.float().contiguous().view(torch.int32) & ~0x1FFF
    return bits.view(torch.float32).double()


def expansion(q, p, sigma, R):
    """Per-query a (Q, 10), per-point b (P, 10), the bound's slack factors |a|_1 (Q,) and
    max |b| (P,), and M (P, 3, 3), all float64."""
    q, p, sigma, R = (t.double() for t in (q, p, sigma, R))
    M = R.transpose(1, 2) @ torch.diag_embed(sigma) @ R
    A = R.abs().transpose(1, 2) @ torch.diag_embed(sigma) @ R.abs()

    def b_of(M, p):
        Mp = torch.einsum("pij,pj->pi", M, p)
        off = torch.stack([M[:, 0, 1], M[:, 0, 2], M[:, 1, 2]], 1)
        return torch.cat(
            [torch.diagonal(M, dim1=1, dim2=2), 2 * off, -2 * Mp, (p * Mp).sum(1, True)], 1
        )

    x, y, z = q.unbind(1)
    a = torch.stack([x * x, y * y, z * z, x * y, x * z, y * z, x, y, z, torch.ones_like(x)], 1)
    b = b_of(M, p)
    return a, b, a.abs().sum(1), b_of(A, p.abs()).abs().max(1).values, M


def tf32_bound(a, b, na, nb):
    """The TF32 lower bound on every (query, point) key: (len(a), len(b))."""
    return tf32(a) @ tf32(b).T - SLACK * 2.0**-10 * na[:, None] * nb[None]


def tile_counts(dist, B, Q, P, K, group=16, tile=32, home=8, seed=0) -> dict:
    """Points per query given an exact key in the tile order, under each bound (docstring)."""
    q, p, sigma, R = inputs(dist, P, Q, batches=B, device="cpu", seed=seed)
    total = dict.fromkeys(("iso", "tf32", "exact"), 0)
    unsound = 0
    for bi in range(B):
        batch = morton_batch(q[bi], p[bi], sigma[bi], R[bi], tile)
        pb, M, lam = batch["p"], batch["M"], batch["lam"]
        a, b, na, nb, _ = expansion(batch["q"], pb, batch["sigma"], batch["R"])
        for w in range(Q // group):
            rows = slice(w * group, (w + 1) * group)
            qw, bound, order = outward_walk(batch, w, group, tile, home)
            best = torch.full((group, K), float("inf"), dtype=torch.float64)
            for t in order:
                gate = best[:, -1:]
                if not bool((bound[:, t] <= gate[:, 0]).any()):
                    continue
                cols = slice(t * tile, (t + 1) * tile)
                d = qw[:, None] - pb[cols][None]
                D = torch.einsum("qpi,pij,qpj->qp", d, M[cols], d)
                lb = tf32_bound(a[rows], b[cols], na[rows], nb[cols])
                unsound += int((lb > D).sum())
                total["iso"] += int((lam[cols][None] * (d**2).sum(-1) <= gate).sum())
                total["tf32"] += int((lb <= gate).sum())
                total["exact"] += int((D <= gate).sum())
                best = torch.cat([best, D], 1).sort(1).values[:, :K]
    queries = B * (Q // group) * group
    return {**{k: v / queries for k, v in total.items()}, "unsound_pairs": unsound}


def brute_counts(dist, Q, P, K, warps=64, round_points=32, seed=0) -> dict:
    """Per query exact keys and insertions, per warp lockstep steps (docstring), B = 1."""
    q, p, sigma, R = inputs(dist, P, Q, batches=1, device="cpu", seed=seed)
    a, b, na, nb, M = expansion(q[0], p[0], sigma[0], R[0])
    pb = p[0].double()
    lane_of = (torch.arange(P) % 8) // 2
    keys = inserted = key_steps = merge_steps = 0
    for w in range(warps):
        rows = slice(w * 8, w * 8 + 8)
        d = q[0, rows].double()[:, None] - pb[None]
        D = torch.einsum("qpi,pij,qpj->qp", d, M, d)
        lb = tf32_bound(a[rows], b, na[rows], nb)
        lists = torch.full((8, 4, K), float("inf"), dtype=torch.float64)
        queued = torch.zeros(8, 4)
        for r0 in range(0, P, round_points):
            gate = lists.reshape(8, -1).sort(1).values[:, K - 1 : K]
            round_keys = torch.zeros(8, 4)
            for t in range(4):
                cols = torch.arange(r0, min(P, r0 + round_points))
                cols = cols[lane_of[cols] == t]
                own = lists[:, t, -1:]
                cand = lb[:, cols] <= torch.minimum(gate, own)
                Dc = torch.where(cand, D[:, cols], torch.inf)
                enter = cand & (Dc <= gate) & (Dc < own)
                round_keys[:, t] = cand.sum(1)
                queued[:, t] += enter.sum(1)
                inserted += int(enter.sum())
                lists[:, t] = torch.cat([lists[:, t], Dc], 1).sort(1).values[:, :K]
            keys += int(round_keys.sum())
            key_steps += int(round_keys.max())
            if queued.max() > 6:  # a lane's queue of 8 nearly full: the warp merges
                merge_steps += int(queued.max())
                queued.zero_()
        merge_steps += int(queued.max())
    return {
        "exact_keys_per_query": keys / (8 * warps),
        "insertions_per_query": inserted / (8 * warps),
        "key_steps_per_warp": key_steps / warps,
        "merge_steps_per_warp": merge_steps / warps,
    }


# the op benchmark's sizes as (Q, P, K); the tile count takes --queries of them, B = 1
SIZES = {
    "reference": (12288, 4096, 16),
    "training": (32768, 16384, 8),
    "P65536": (12288, 65536, 16),
}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    ap.add_argument("--queries", type=int, default=2048, help="queries a batch in the tile count")
    args = ap.parse_args(argv)
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    rows = []
    for dist in ("cube", "sphere"):
        for name, (Q, P, K) in SIZES.items():
            row = {"dist": dist, "size": name, "B": 1, "Q": args.queries, "P": P, "K": K}
            row["tile"] = tile_counts(dist, 1, args.queries, P, K)
            if P <= 16384:
                row["brute"] = brute_counts(dist, Q, P, K, warps=64 if P <= 4096 else 16)
            rows.append(row)
            print(row, flush=True)
    write_json(args.json, {"slack_c": SLACK, "rows": rows}, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0 if all(r["tile"]["unsound_pairs"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
