"""Where a CUDA search's time goes besides the GPU's work: the host's launches.

For each of the op benchmark's sizes (``reference``, ``P=65536``, ``training-search``) and one
search method, times ``torch.ops.neusdf.knn_search`` three ways and the forward once:

- ``graph_ms``: one search replayed in a CUDA graph (the GPU time alone, as a training step
  replays it; ``search_crossover.graph_ms``);
- ``raw_ms`` and ``public_ms``: CUDA events around one call of the raw operator and of
  ``knn_search_aniso`` (median of ``--reps``), which include the time the GPU waits for the
  host's launches;
- ``host_ms``: the host's wall time for one raw call started with the GPU idle, and
  ``public_host_ms`` the same for ``knn_search_aniso`` (the difference is the Python layer:
  its input checks and the operator's lookup);
- ``forward_ms`` (events, ``knn_aggregate_aniso``), ``forward_graph_ms`` (the same forward as
  a graph) and ``forward_host_ms`` (its host time), and ``aggregate_graph_ms``;

and counts, with the torch profiler, the CUDA runtime calls (kernel launches, memsets) of one
search with the host microseconds each takes (``runtime_call_us``), and its device activities.

    python benchmarks/search_host.py host.json
    python benchmarks/search_host.py host.json --method grid --size reference
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

from neusdf.ops import knn_aggregate_aniso, knn_search_aniso
from neusdf.ops.benchmark import SIZES, call_times
from neusdf.ops.knn import ensure_registered
from neusdf.ops.testing import make_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import graph_ms, write_rows  # noqa: E402

DEFAULT_SIZES = ("reference", "P=65536", "training-search")


def event_ms(fn, reps: int) -> float:
    """Median milliseconds between CUDA events around single calls of fn (after 10 warm-ups)."""
    return statistics.median(call_times("cuda", fn, warmup=10, reps=reps))


def host_ms(fn, reps: int = 50) -> float:
    """Median host milliseconds of one call of fn, each started with the GPU idle."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def runtime_calls(fn, calls: int = 10) -> tuple[dict, dict, dict]:
    """CUDA runtime calls (CPU side) per call of fn, the mean host microseconds of each kind,
    and the device activities per call of fn (torch profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    host, host_us, device = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            device[event.name[:80]] += 1
        elif event.name.startswith("cuda") and event.name != "cudaDeviceSynchronize":
            host[event.name] += 1
            host_us[event.name] += event.cpu_time_total
    return (
        {k: v / calls for k, v in host.items()},
        {k: host_us[k] / v for k, v in host.items()},
        {k: v / calls for k, v in device.items()},
    )


def measure(size: str, method: str, reps: int) -> dict:
    """Every figure of the module docstring for one size."""
    B, Q, P, F, K = SIZES[size]
    q, p, f, sigma, R = make_inputs(B, Q, P, F, device="cuda", seed=0)
    raw = torch.ops.neusdf.knn_search

    def search():
        return raw(q, p, sigma, R, K, method)

    def public():
        return knn_search_aniso(q, p, sigma, R, K, method=method)

    def forward():
        return knn_aggregate_aniso(q, p, f, sigma, R, K, search=method)

    with torch.no_grad():
        idx = search()
        row = {
            "size": size,
            "B": B,
            "Q": Q,
            "P": P,
            "F": F,
            "K": K,
            "method": method,
            "graph_ms": graph_ms(search, reps=20),
            "raw_ms": event_ms(search, reps),
            "public_ms": event_ms(public, reps),
            "host_ms": host_ms(search),
            "public_host_ms": host_ms(public),
            "forward_ms": event_ms(forward, reps),
            "forward_graph_ms": graph_ms(forward, reps=20),
            "forward_host_ms": host_ms(forward),
            "aggregate_graph_ms": graph_ms(
                lambda: torch.ops.neusdf.knn_aggregate(q, p, f, sigma, R, idx), reps=20
            ),
        }
        row["runtime_calls"], row["runtime_call_us"], row["device_activities"] = runtime_calls(
            search
        )
    return row


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    ap.add_argument("--method", default="tile", choices=("tile", "grid", "brute", "auto"))
    ap.add_argument(
        "--size", action="append", choices=list(SIZES), help="default: " + ", ".join(DEFAULT_SIZES)
    )
    ap.add_argument("--reps", type=int, default=200, help="timed calls per event median")
    args = ap.parse_args(argv)
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    if args.reps < 1:
        ap.error("--reps: expected a positive integer")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    ensure_registered()
    rows = []
    for size in args.size or DEFAULT_SIZES:
        row = measure(size, args.method, args.reps)
        rows.append(row)
        calls = sum(
            row["runtime_calls"].get(k, 0)
            for k in ("cudaLaunchKernel", "cudaLaunchCooperativeKernel", "cudaMemsetAsync")
        )
        print(
            f"{size:16s} graph {row['graph_ms']:.4f}  raw {row['raw_ms']:.4f}  public "
            f"{row['public_ms']:.4f}  host {row['host_ms']:.4f} (public "
            f"{row['public_host_ms']:.4f})  forward {row['forward_ms']:.4f} (graph "
            f"{row['forward_graph_ms']:.4f}, host {row['forward_host_ms']:.4f})  "
            f"aggregate graph {row['aggregate_graph_ms']:.4f} ms; launches + memsets {calls:g}",
            flush=True,
        )
    write_rows(args.json, rows, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
