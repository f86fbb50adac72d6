"""Benchmark of the compiled op against the plain-PyTorch reference (EVAL.md protocol).

    python -m neusdf.ops.benchmark --json results.json            # CUDA, both sizes
    python -m neusdf.ops.benchmark --device cpu --small           # a quick CPU run

For each size and implementation it times, in milliseconds (median of CUDA-event timings after
warm-up; wall clock on the CPU):

- forward: search + aggregation, no autograd;
- forward + backward: the same with gradients to q, p, f, sigma, R for a random upstream on
  f_out;
- Eikonal step: forward, a linear head to a scalar per query, grad w.r.t. q with
  create_graph, loss (|grad| - 1)^2 + |s|, backward to all inputs;

and the peak memory of the Eikonal step above what was allocated before it (CUDA only). It
prints a markdown table with the speed-up against the reference measured in the same run and
writes everything as JSON.
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

from neusdf.ops.knn import knn_aggregate_aniso
from neusdf.ops.reference import knn_aggregate_aniso_reference
from neusdf.ops.testing import make_inputs

IMPLEMENTATIONS: dict[str, Callable] = {
    "neusdf": knn_aggregate_aniso,
    "plain PyTorch": knn_aggregate_aniso_reference,
}


def _timer(device: str, fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of fn after ``warmup`` untimed calls."""
    for _ in range(warmup):
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


def _steps(impl: Callable, inputs, K: int, head: torch.Tensor, upstream: torch.Tensor):
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


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(sizes, device: str, warmup: int, reps: int, impls: list[str]) -> list[dict]:
    """Times every implementation at every size; returns one record per (size, impl)."""
    records = []
    for B, Q, P, F, K in sizes:
        inputs = make_inputs(B, Q, P, F, device=device, seed=0)
        g = torch.Generator().manual_seed(1)
        head = torch.randn(F, generator=g).to(device) / F**0.5
        upstream = torch.randn(B, Q, F, generator=g).to(device)
        for name in impls:
            steps = _steps(IMPLEMENTATIONS[name], inputs, K, head, upstream)
            rec = {"B": B, "Q": Q, "P": P, "F": F, "K": K, "impl": name, "device": device}
            for step, fn in steps.items():
                times = _timer(device, fn, warmup, reps)
                rec[f"{step}_ms"] = statistics.median(times)
                rec[f"{step}_ms_all"] = times
            if device == "cuda":
                rec["eikonal_peak_mib"] = _peak_mib(steps["eikonal"])
            records.append(rec)
            print(
                f"  {name:>14} B={B} Q={Q} P={P} F={F} K={K}: "
                f"fwd {rec['forward_ms']:.3f} ms, fwd+bwd {rec['forward_backward_ms']:.3f} ms, "
                f"eikonal {rec['eikonal_ms']:.3f} ms",
                flush=True,
            )
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
        cells = [statistics.median(_timer(device, fn, 20, reps)) for fn in steps.values()]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def table(records: list[dict]) -> str:
    """Markdown table with ratios against the plain-PyTorch row of the same size."""
    lines = [
        "| size (B, Q, P, F, K) | implementation | forward ms | fwd+bwd ms | Eikonal ms "
        "| peak MiB (Eikonal) | speed-up fwd / fwd+bwd / Eikonal |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        size = (rec["B"], rec["Q"], rec["P"], rec["F"], rec["K"])
        base = next(
            (
                r
                for r in records
                if r["impl"] == "plain PyTorch" and (r["B"], r["Q"], r["P"], r["F"], r["K"]) == size
            ),
            None,
        )
        ratio = "-"
        if base is not None:
            ratio = " / ".join(
                f"{base[k] / rec[k]:.1f}x"
                for k in ("forward_ms", "forward_backward_ms", "eikonal_ms")
            )
        peak = f"{rec['eikonal_peak_mib']:.1f}" if "eikonal_peak_mib" in rec else "-"
        lines.append(
            f"| {size} | {rec['impl']} | {rec['forward_ms']:.3f} "
            f"| {rec['forward_backward_ms']:.3f} | {rec['eikonal_ms']:.3f} | {peak} | {ratio} |"
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
    parser.add_argument("--impl", action="append", choices=list(IMPLEMENTATIONS))
    parser.add_argument("--profile", action="store_true", help="per-kernel times (CUDA only)")
    parser.add_argument("--overhead", action="store_true", help="host time per step, tiny sizes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.json and args.json.exists() and not args.overwrite:
        parser.error(f"--json {args.json} exists; pass --overwrite to replace it")
    if args.small:
        sizes = [(2, 1024, 512, 32, 16)]
    else:
        sizes = [(2, 12288, 4096, 64, 16), (2, 12288, 65536, 64, 16)]
    impls = args.impl or list(IMPLEMENTATIONS)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    if args.overhead:
        print("host overhead (tiny problem):\n" + host_overhead(args.device), flush=True)
    if args.profile and args.device == "cuda":
        print(profile_eikonal(*sizes[0]), flush=True)
    records = run(sizes, args.device, args.warmup, args.reps, impls)
    print(table(records))
    if args.json:
        payload = {"device": device_name, "torch": torch.__version__, "records": records}
        write_json(args.json, payload, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
