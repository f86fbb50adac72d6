"""Where one CUDA search method overtakes another (what "auto" is set from).

For every (distribution, P, Q, K) times ``torch.ops.neusdf.knn_search`` with each of
``--methods`` (default ``brute,tile``) as CUDA-graph replays (the GPU time alone, as a training
step replays it), checks that all return the first method's indices, and prints each method's
time over the first's. Two distributions of the op benchmark's inputs
(``neusdf.ops.testing.make_inputs``, B = 2 unless ``--batches``): ``cube`` as they are (points in
the cube, 70% of the queries near points), ``sphere`` with the points projected on the unit
sphere and 70% of the queries drawn near them (a surface, like a shape's neural points).
``--metric euclidean`` searches without sigma and R (the Euclidean kernels).

    python benchmarks/search_crossover.py crossover.json
    python benchmarks/search_crossover.py crossover.json --points 4096 --queries 2048,12288
    python benchmarks/search_crossover.py upper.json --batches 1 --points 131072,262144 \
        --queries 65536 --k 16 --methods grid,tile
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from neusdf.ops.benchmark import write_json
from neusdf.ops.knn import SEARCH_METHODS, ensure_registered
from neusdf.ops.testing import make_inputs

B = 2


def graph_ms(fn, reps: int = 10, rounds: int = 9) -> float:
    """Median milliseconds per call of fn over ``rounds`` replays of a graph of ``reps`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy loading)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def inputs(dist: str, P: int, Q: int, batches: int = B, device: str = "cuda", seed: int = 0):
    """(q, p, sigma, R) on ``device`` for one distribution (see the module docstring):
    ``make_inputs`` with ``seed``, the sphere's draws from a generator seeded ``seed + 1``."""
    q, p, _, sigma, R = make_inputs(batches, Q, P, 1, device=device, seed=seed)
    if dist == "sphere":
        g = torch.Generator(device=device).manual_seed(seed + 1)
        p = torch.nn.functional.normalize(p, dim=-1)
        near = p[:, torch.randint(0, P, (Q,), device=device, generator=g)]
        near = near + 0.05 * torch.randn(near.shape, device=device, generator=g)
        q = torch.where(torch.rand(batches, Q, 1, device=device, generator=g) < 0.7, near, q)
    return q, p, sigma, R


def compare(q, p, sigma, R, K: int, methods: list[str]) -> dict:
    """Graph milliseconds of each method for one input, and whether all return the first
    method's indices. sigma and R may be None (the Euclidean metric)."""
    search = torch.ops.neusdf.knn_search
    times = {m: graph_ms(lambda m=m: search(q, p, sigma, R, K, m)) for m in methods}
    first = search(q, p, sigma, R, K, methods[0])
    same = all(torch.equal(search(q, p, sigma, R, K, m), first) for m in methods[1:])
    return {**times, "equal": same}


def write_rows(path: Path, rows: list[dict], overwrite: bool = False) -> None:
    """Writes the rows with the GPU's name and torch's version as JSON (atomically) and says so."""
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    write_json(path, record, overwrite=overwrite)
    print(f"wrote {path}")


def ints(text: str) -> list[int]:
    """A comma list of positive integers (argparse type)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        message = f"expected a comma list of integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    ap.add_argument("--points", type=ints, default=[2048, 4096, 8192], help="P values")
    ap.add_argument("--queries", type=ints, default=[2048, 12288], help="Q values (per batch)")
    ap.add_argument("--k", type=ints, default=[8, 16, 32], help="K values (at most 32)")
    ap.add_argument("--batches", type=int, default=B, help="B, batches of P points and Q queries")
    ap.add_argument("--methods", default="brute,tile", help="comma list of search methods")
    ap.add_argument("--metric", choices=("anisotropic", "euclidean"), default="anisotropic")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if len(methods) < 2 or not set(methods) <= set(SEARCH_METHODS):
        ap.error(f"--methods: expected two or more of {SEARCH_METHODS}, got {args.methods!r}")
    if max(args.k) > 32:
        ap.error("--k: the grid and tile searches take K <= 32")
    if args.batches < 1:
        ap.error(f"--batches: expected a positive integer, got {args.batches}")
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    ensure_registered()
    rows = []
    for dist in ("cube", "sphere"):
        for P in args.points:
            for Q in args.queries:
                q, p, sigma, R = inputs(dist, P, Q, batches=args.batches)
                if args.metric == "euclidean":
                    sigma = R = None
                for K in (k for k in args.k if k <= P):
                    row = {"dist": dist, "metric": args.metric, "B": args.batches, "P": P}
                    row.update({"Q": Q, "K": K, **compare(q, p, sigma, R, K, methods)})
                    rows.append(row)
                    times = "  ".join(
                        f"{m} {row[m]:.4f} ms ({row[m] / row[methods[0]]:.2f})" for m in methods
                    )
                    print(
                        f"{dist:6s} P={P:7d} Q={Q:7d} K={K:2d}  {times}  identical {row['equal']}",
                        flush=True,
                    )
    write_rows(args.json, rows, overwrite=args.overwrite)
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
