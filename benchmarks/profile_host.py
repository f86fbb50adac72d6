"""Where the host time of an Eikonal step goes: cProfile on a tiny problem.

On a tiny problem (B=1, Q=P=64) the kernels take microseconds, so the step's wall time is host
time: Python, the autograd engine, dispatch and launches. Prints the functions with the most
own time and the most cumulative time.

    python benchmarks/profile_host.py [--device cuda] [--steps 300]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from neusdf.ops.benchmark import _steps
from neusdf.ops.knn import knn_aggregate_aniso
from neusdf.ops.testing import make_inputs


def main() -> None:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    inputs = make_inputs(1, 64, 64, 8, device=args.device, seed=0)
    head = torch.randn(8, device=args.device)
    upstream = torch.randn(1, 64, 8, device=args.device)
    step = _steps(knn_aggregate_aniso, inputs, 8, head, upstream)["eikonal"]
    for _ in range(30):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumtime").print_stats(18)


if __name__ == "__main__":
    main()
