"""Does a CUDA graph holding a captured NCCL all-reduce replay correctly, and can the process
group be destroyed while that graph is alive?

Each rank all-reduces a buffer of 700k floats (the size of the default model's gradients)
three times eagerly on a side stream (which creates the communicator), captures one
all-reduce and a division in a CUDA graph, replays it 20 times and checks the average, times
1000 replays, then destroys the process group. Lightning destroys it at exit, so a hang there
hangs every DDP run whose step graph holds the gradient all-reduce. ``release`` deletes the
graph first.

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        benchmarks/nccl_graph_exit.py plain        # 2 GPUs
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        benchmarks/nccl_graph_exit.py release

Measured (2 H100 of one host, torch 2.11 + CUDA 13.0, ``benchmarks/RESULTS.md``): both
replay correctly (1000 replays: 39 ms); ``plain`` hangs in ``destroy_process_group`` (killed
after 60 s), ``release`` destroys it in 0.44 s. (Measured with this script's first version,
the same steps with the world size fixed at 2; this version has not run on GPUs yet.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

GRADIENT_FLOATS = 700_000


def main() -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", choices=["plain", "release"])
    args = ap.parse_args()
    if "LOCAL_RANK" not in os.environ:
        ap.error("start it with python -m torch.distributed.run (see the docstring)")
    rank = int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    x = torch.full((GRADIENT_FLOATS,), float(rank + 1), device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            y = x * 1.0
            dist.all_reduce(y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        y = x * 1.0
        dist.all_reduce(y)
        y /= dist.get_world_size()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    expect = (dist.get_world_size() + 1) / 2
    print(f"rank {rank}: replays give {y[0].item()} (expected {expect})", flush=True)
    t = time.perf_counter()
    for _ in range(1000):
        graph.replay()
    torch.cuda.synchronize()
    print(f"rank {rank}: 1000 replays {1000 * (time.perf_counter() - t):.1f} ms", flush=True)
    if args.variant == "release":
        del graph, y
        torch.cuda.synchronize()
    t = time.perf_counter()
    dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed in {time.perf_counter() - t:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
