"""Benchmark of the compiled op against the plain-PyTorch reference.

    python -m neusdf.ops.benchmark --json results.json            # CUDA, all sizes
    python -m neusdf.ops.benchmark --size reference --size training-search
    python -m neusdf.ops.benchmark --device cpu --small           # a quick CPU run

Sizes (B, Q, P, F, K): ``reference`` (2, 12288, 4096, 64, 16), ``P=65536`` (2, 12288, 65536,
64, 16), ``P=1M`` (1, 262144, 1048576, 32, 16) and ``training-search`` (1, 32768, 16384, 32,
8), the search of one training step. Implementations: ``neusdf`` (search method "auto"),
``neusdf grid``, ``neusdf tile`` and ``neusdf brute`` (the search forced; search time only),
``neusdf euclidean`` (the brute-force search under the Euclidean metric, sigma = R = None, as the
model's tangent-plane search runs it; search time only) and ``plain PyTorch``
(``neusdf.ops.reference``), which runs only where its chunked distance matrix fits in half
the free memory. For each it times, in milliseconds (median of CUDA-event timings after
warm-up; wall clock on the CPU; fewer repetitions for calls over 100 ms):

- search: the neighbour search alone;
- forward: search + aggregation, no autograd;
- forward + backward: the same with gradients to q, p, f, sigma, R for a random upstream on
  f_out;
- Eikonal step: forward, a linear head to a scalar per query, grad w.r.t. q with
  create_graph, loss (|grad| - 1)^2 + |s|, backward to all inputs;

and the peak memory of the Eikonal step above what was allocated before it (CUDA only). It
prints a markdown table with speed-ups against plain PyTorch and against the brute-force
search measured in the same run, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neusdf.ops.knn import knn_aggregate_aniso, knn_search_aniso
from neusdf.ops.reference import knn_aggregate_aniso_reference, knn_search_aniso_reference
from neusdf.ops.testing import make_inputs

IMPLEMENTATIONS: dict[str, Callable] = {
    "neusdf": knn_aggregate_aniso,
    "plain PyTorch": knn_aggregate_aniso_reference,
}
SEARCHES: dict[str, Callable] = {
    "neusdf": knn_search_aniso,
    "neusdf grid": lambda q, p, s, R, K: knn_search_aniso(q, p, s, R, K, method="grid"),
    "neusdf tile": lambda q, p, s, R, K: knn_search_aniso(q, p, s, R, K, method="tile"),
    "neusdf brute": lambda q, p, s, R, K: knn_search_aniso(q, p, s, R, K, method="brute"),
    # the Euclidean metric (sigma = R = None) on the same points, brute force
    "neusdf euclidean": lambda q, p, s, R, K: knn_search_aniso(q, p, None, None, K, method="brute"),
    "plain PyTorch": knn_search_aniso_reference,
}
# name -> (B, Q, P, F, K)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "reference": (2, 12288, 4096, 64, 16),
    "P=65536": (2, 12288, 65536, 64, 16),
    "P=1M": (1, 262144, 1048576, 32, 16),
    "training-search": (1, 32768, 16384, 32, 8),
}
SMALL_SIZES = {"small": (1, 2048, 8192, 16, 8)}


def call_times(device: str, fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of fn after ``warmup`` untimed calls (for calls
    over 100 ms: one warm-up and 3 repetitions, to keep the run short)."""
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.1:
        warmup, reps = 0, min(reps, 3)
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _search_step(search: Callable, inputs, K: int) -> Callable[[], None]:
    """The timed search alone (no autograd)."""
    q, p, _, sigma, R = inputs

    def search_only():
        with torch.no_grad():
            search(q, p, sigma, R, K)

    return search_only


def _steps(impl: Callable, inputs, K: int, head: torch.Tensor, upstream: torch.Tensor):
    """The timed forward, forward + backward and Eikonal step of one implementation."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            impl(*inputs, K)

    def forward_backward():
        f_out = impl(*leaves, K)[0]
        torch.autograd.backward(f_out, upstream)

    def eikonal():
        q = leaves[0]
        f_out = impl(*leaves, K)[0]
        s = f_out @ head
        (grad_q,) = torch.autograd.grad(s.sum(), q, create_graph=True)
        loss = ((grad_q.norm(dim=-1) - 1) ** 2).mean() + s.abs().mean()
        loss.backward()

    return {"forward": forward, "forward_backward": forward_backward, "eikonal": eikonal}


def _reference_fits(B: int, Q: int, P: int, device: str) -> bool:
    """Whether the plain-PyTorch reference's intermediates (about four (B, chunk, P, 3)
    float32 tensors, chunk = min(Q, 4096)) fit in half the free memory (always on the CPU
    below 8 GiB)."""
    need = 4 * B * min(Q, 4096) * P * 3 * 4
    if device != "cuda":
        return need < 8 * 2**30
    free, _ = torch.cuda.mem_get_info()
    return need < free / 2


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(sizes: dict, device: str, warmup: int, reps: int, impls: list[str]) -> list[dict]:
    """Times every implementation at every size; returns one record per (size, impl)."""
    records = []
    for size_name, (B, Q, P, F, K) in sizes.items():
        inputs = make_inputs(B, Q, P, F, device=device, seed=0)
        g = torch.Generator().manual_seed(1)
        head = (torch.randn(F, generator=g) / F**0.5).to(device)
        upstream = torch.randn(B, Q, F, generator=g).to(device)
        for name in impls:
            if name == "plain PyTorch" and not _reference_fits(B, Q, P, device):
                print(f"  {name:>14} {size_name}: skipped (does not fit)", flush=True)
                continue
            fns = {"search": _search_step(SEARCHES[name], inputs, K)}
            if name in IMPLEMENTATIONS:
                fns.update(_steps(IMPLEMENTATIONS[name], inputs, K, head, upstream))
            rec = {"size": size_name, "B": B, "Q": Q, "P": P, "F": F, "K": K, "impl": name}
            rec["device"] = device
            for step, fn in fns.items():
                times = call_times(device, fn, warmup, reps)
                rec[f"{step}_ms"] = statistics.median(times)
                rec[f"{step}_ms_all"] = times
            if device == "cuda" and "eikonal" in fns:
                rec["eikonal_peak_mib"] = _peak_mib(fns["eikonal"])
            records.append(rec)
            timed = ", ".join(f"{k} {rec[k + '_ms']:.3f} ms" for k in fns)
            print(f"  {name:>14} {size_name} B={B} Q={Q} P={P} F={F} K={K}: {timed}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return records


def profile_eikonal(B: int, Q: int, P: int, F: int, K: int) -> str:
    """Per-kernel CUDA times of a few compiled-op Eikonal steps (torch.profiler table)."""
    inputs = make_inputs(B, Q, P, F, device="cuda", seed=0)
    head = torch.randn(F, device="cuda") / F**0.5
    upstream = torch.randn(B, Q, F, device="cuda")
    step = _steps(knn_aggregate_aniso, inputs, K, head, upstream)["eikonal"]
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def host_overhead(device: str, reps: int = 200) -> str:
    """Milliseconds per step on a tiny problem (B=1, Q=P=64, F=8, K=8), where kernels take a
    few microseconds: what remains is host time (Python, dispatch, launches)."""
    inputs = make_inputs(1, 64, 64, 8, device=device, seed=0)
    head = torch.randn(8, device=device)
    upstream = torch.randn(1, 64, 8, device=device)
    lines = ["| implementation | forward ms | fwd+bwd ms | Eikonal ms |", "|---|---|---|---|"]
    for name, impl in IMPLEMENTATIONS.items():
        steps = _steps(impl, inputs, 8, head, upstream)
        cells = [statistics.median(call_times(device, fn, 20, reps)) for fn in steps.values()]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def table(records: list[dict]) -> str:
    """Markdown table with ratios against the plain-PyTorch row and the brute-force search
    row of the same size (measured in the same run)."""
    lines = [
        "| size (B, Q, P, F, K) | implementation | search ms | forward ms | fwd+bwd ms "
        "| Eikonal ms | peak MiB (Eikonal) | search vs brute | speed-up vs plain PyTorch "
        "(search / fwd / fwd+bwd / Eikonal) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(rec: dict, key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(rec[key]) if key in rec else "-"

    for rec in records:
        size = (rec["B"], rec["Q"], rec["P"], rec["F"], rec["K"])
        same = [r for r in records if (r["B"], r["Q"], r["P"], r["F"], r["K"]) == size]
        base = next((r for r in same if r["impl"] == "plain PyTorch"), None)
        brute = next((r for r in same if r["impl"] == "neusdf brute"), None)
        keys = ("search_ms", "forward_ms", "forward_backward_ms", "eikonal_ms")
        ratio = "-"
        if base is not None and rec is not base:
            ratio = " / ".join(
                f"{base[k] / rec[k]:.1f}x" if k in rec and k in base else "-" for k in keys
            )
        vs_brute = "-"
        if brute is not None and "search_ms" in rec and rec is not brute:
            vs_brute = f"{brute['search_ms'] / rec['search_ms']:.1f}x"
        lines.append(
            f"| {size} | {rec['impl']} | {cell(rec, 'search_ms')} | {cell(rec, 'forward_ms')} "
            f"| {cell(rec, 'forward_backward_ms')} | {cell(rec, 'eikonal_ms')} "
            f"| {cell(rec, 'eikonal_peak_mib', '{:.1f}')} | {vs_brute} | {ratio} |"
        )
    return "\n".join(lines)


def write_json(path: Path, data: dict, overwrite: bool = False) -> None:
    """Writes ``data`` as indented JSON through a temporary file in the same directory, so a
    crash never leaves half a file (non-finite floats become null). The op package keeps its
    own writer: it imports nothing from the rest of neusdf."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(clean(data), indent=2) + "\n")
        umask = os.umask(0)  # mkstemp makes 0600 files; use what a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (a quick CPU run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the records here (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    parser.add_argument("--impl", action="append", choices=list(SEARCHES))
    parser.add_argument("--size", action="append", choices=list(SIZES), help="default: all")
    parser.add_argument("--profile", action="store_true", help="per-kernel times (CUDA only)")
    parser.add_argument("--overhead", action="store_true", help="host time per step, tiny sizes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.json and args.json.exists() and not args.overwrite:
        parser.error(f"--json {args.json} exists; pass --overwrite to replace it")
    if args.small:
        sizes = SMALL_SIZES
    else:
        sizes = {name: SIZES[name] for name in (args.size or SIZES)}
    impls = args.impl or list(SEARCHES)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    if args.overhead:
        print("host overhead (tiny problem):\n" + host_overhead(args.device), flush=True)
    if args.profile and args.device == "cuda":
        print(profile_eikonal(*next(iter(sizes.values()))), flush=True)
    records = run(sizes, args.device, args.warmup, args.reps, impls)
    print(table(records))
    if args.json:
        payload = {"device": device_name, "torch": torch.__version__, "records": records}
        write_json(args.json, payload, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
