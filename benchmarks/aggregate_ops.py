"""The aggregation operators alone, on fixed neighbours: what a change to their kernels moves.

For each size, searches once, then times ``torch.ops.neusdf.knn_aggregate`` (the forward),
``knn_aggregate_backward`` with the features' upstream only (what ``fwd+bwd`` runs) and with
all three upstreams, ``knn_aggregate_double_backward`` (what the Eikonal loss adds) and the
public forward (search and aggregation) with the op benchmark's inputs (random upstreams, seeded).
On CUDA each time is a CUDA-graph replay (the GPU time alone, median of 9 replays of 10 calls);
on the CPU the median wall time of 5 calls. Checksums of every output let two builds' rows be
compared: run the script under each build (its own ``TORCH_EXTENSIONS_DIR`` and checkout on
``PYTHONPATH``), then compare the JSON files.

``--query-order morton`` sorts each batch's queries along a Morton curve over their bounding box
before the search (the queries come in random order otherwise): the order in which the
operators visit the queries then follows space, so that a block's queries share most of their
neighbours' feature rows. It measures what the kernels would gain from visiting the queries in
the search's own Morton order (the checksums then differ, the queries being permuted).

    python benchmarks/aggregate_ops.py aggregate.json
    python benchmarks/aggregate_ops.py small.json --device cpu --size small
    python benchmarks/aggregate_ops.py sorted.json --query-order morton
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import graph_ms  # noqa: E402
from tile_skip_model import morton  # noqa: E402

from neusdf.ops import knn_aggregate_aniso  # noqa: E402
from neusdf.ops.benchmark import SIZES, SMALL_SIZES, call_times, write_json  # noqa: E402
from neusdf.ops.knn import ensure_registered  # noqa: E402
from neusdf.ops.testing import make_inputs  # noqa: E402

# The op benchmark's sizes, and two the aggregation alone is sensitive to: the training step's
# F and K at the reference size, and the reference size in float64. name -> (B, Q, P, F, K, dtype)
EXTRA_SIZES = {
    "reference-F32-K8": (2, 12288, 4096, 32, 8, torch.float32),
    "reference-float64": (*SIZES["reference"], torch.float64),
}


def sizes() -> dict[str, tuple]:
    """Every size this script knows, name -> (B, Q, P, F, K, dtype)."""
    known = {name: (*size, torch.float32) for name, size in {**SIZES, **SMALL_SIZES}.items()}
    return {**known, **EXTRA_SIZES}


def checksums(tensors) -> list[float]:
    """Sum and sum of magnitudes of each tensor, in float64 (None for an absent output)."""
    sums = []
    for t in tensors:
        if t is None or t.numel() == 0:
            sums.append(None)
            continue
        t = t.double()
        sums += [float(t.sum()), float(t.abs().sum())]
    return sums


def morton_sorted(q: torch.Tensor) -> torch.Tensor:
    """q (B, Q, 3) with each batch's queries sorted by their Morton code over the batch's
    bounding box (``tile_skip_model.morton``); a non-finite coordinate counts as 0."""
    q0 = torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = q0.amin(1), q0.amax(1)
    order = torch.stack([torch.argsort(morton(q0[b], lo[b], hi[b])) for b in range(len(q))])
    return torch.gather(q, 1, order[..., None].expand(-1, -1, 3)).contiguous()


def measure(name: str, device: str, query_order: str = "given") -> dict:
    """Times and checksums of the aggregation operators at size ``name`` on ``device``, the
    queries in their given (random) order or sorted along a Morton curve (``"morton"``)."""
    B, Q, P, F, K, dtype = sizes()[name]
    q, p, f, sigma, R = make_inputs(B, Q, P, F, dtype=dtype, device=device, seed=0)
    if query_order == "morton":
        q = morton_sorted(q)
    gen = torch.Generator(device=device).manual_seed(1)

    def randn(*shape):
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    ops = torch.ops.neusdf
    if device == "cuda":
        timer = graph_ms
    else:  # the op benchmark's timer: one untimed call, then the median of 5

        def timer(fn):
            return statistics.median(call_times(device, fn, warmup=1, reps=5))

    with torch.no_grad():
        idx = ops.knn_search(q, p, sigma, R, K, "auto")
        gf, gw, gD, ggq = randn(B, Q, F), randn(B, Q, K), randn(B, Q, K), randn(B, Q, 3)
        calls = {
            "forward": lambda: ops.knn_aggregate(q, p, f, sigma, R, idx),
            "backward_gf": lambda: ops.knn_aggregate_backward(
                gf, None, None, q, p, f, sigma, R, idx
            ),
            "backward_all": lambda: ops.knn_aggregate_backward(gf, gw, gD, q, p, f, sigma, R, idx),
            "double_backward": lambda: ops.knn_aggregate_double_backward(
                ggq, gf, gw, gD, q, p, f, sigma, R, idx
            ),
            "public_forward": lambda: knn_aggregate_aniso(q, p, f, sigma, R, K),
        }
        record = {"size": name, "B": B, "Q": Q, "P": P, "F": F, "K": K, "dtype": str(dtype)}
        record["query_order"] = query_order
        for op, fn in calls.items():
            record[f"{op}_ms"] = timer(fn)
            if op != "public_forward":
                record[f"{op}_checksums"] = checksums(fn())
    return record


def table(records: list[dict]) -> str:
    """A markdown table of the records' times."""
    ops = ["forward", "backward_gf", "backward_all", "double_backward", "public_forward"]
    lines = ["| size | " + " | ".join(f"{op} ms" for op in ops) + " |", "|---" * 6 + "|"]
    for rec in records:
        cells = " | ".join(f"{rec[f'{op}_ms']:.4f}" for op in ops)
        lines.append(
            f"| {rec['size']} ({rec['B']}, {rec['Q']}, {rec['P']}, {rec['F']}, "
            f"{rec['K']}, {rec['dtype'].removeprefix('torch.')}) | {cells} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="write the records here (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size",
        action="append",
        choices=list(sizes()),
        help="default: the op benchmark's sizes and " + ", ".join(EXTRA_SIZES),
    )
    parser.add_argument(
        "--query-order",
        choices=("given", "morton"),
        default="given",
        help="the queries as make_inputs draws them (random) or sorted along a Morton curve",
    )
    parser.add_argument("--label", default="", help="a name for this build, kept in the JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.json.exists() and not args.overwrite:
        parser.error(f"{args.json} exists; pass --overwrite to replace it")
    names = args.size or [*SIZES, *EXTRA_SIZES]
    ensure_registered()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    records = []
    for name in names:
        records.append(measure(name, args.device, args.query_order))
        print(table(records[-1:]).splitlines()[-1], flush=True)
    print(table(records))
    payload = {
        "device": device_name,
        "torch": torch.__version__,
        "label": args.label,
        "query_order": args.query_order,
        "timer": "graph" if args.device == "cuda" else "wall",
        "records": records,
    }
    write_json(args.json, payload, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
