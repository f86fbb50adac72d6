"""Forward, forward + backward and the Eikonal step: one call at a time against a loop.

For tiny inputs (B = 1, Q = P = 64, F = 8, K = 8) and the reference size, the op benchmark's
three steps (``neusdf.ops.benchmark._steps``): the median and fastest of 100 single calls
between CUDA events (as the benchmark times them), and the milliseconds a step over a loop of
100 (host time at the loop's end, and after a synchronisation); then torch.profiler over 20
forward + backward and 20 Eikonal steps. One H200; writes the JSON named on the command line.

    python benchmarks/host_time_h200/bwd_probe.py out.json
"""

import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from neusdf.ops.benchmark import _steps, call_times
from neusdf.ops.knn import knn_aggregate_aniso
from neusdf.ops.testing import make_inputs

SIZES = {"tiny": (1, 64, 64, 8, 8), "reference": (2, 12288, 4096, 64, 16)}


def main() -> None:
    out = {}
    for size, (B, Q, P, F, K) in SIZES.items():
        inputs = make_inputs(B, Q, P, F, device="cuda", seed=0)
        head = torch.randn(F, device="cuda") / F**0.5
        up = torch.randn(B, Q, F, device="cuda")
        steps = _steps(knn_aggregate_aniso, inputs, K, head, up)
        res = {}
        for name, fn in steps.items():
            ev = call_times("cuda", fn, 20, 100)
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(100):
                fn()
            host = (time.perf_counter() - t) / 100 * 1e3
            torch.cuda.synchronize()
            loop = (time.perf_counter() - t) / 100 * 1e3
            res[name] = dict(
                event_ms=round(statistics.median(ev), 4),
                event_min=round(min(ev), 4),
                host_loop_ms=round(host, 4),
                loop_synced_ms=round(loop, 4),
            )
        out[size] = res
        print(size, json.dumps(res), flush=True)
        for name in ("forward_backward", "eikonal"):
            fn = steps[name]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            tab = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            out[f"{size} {name} profile"] = tab
            if size == "tiny":
                print(name, tab, flush=True)
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
