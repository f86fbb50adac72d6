"""Host time of the op's entry points, and the GPU's idle time before a call's first kernel.

For tiny inputs (B = 1, Q = P = 64, F = 8, K = 8) and the reference size: microseconds a call
over a loop of calls without synchronisation (the host alone where the kernels take
microseconds), then, at the reference size, CUDA events around one call as it comes against the
same call queued behind a sleeping kernel (the GPU's time alone), then torch.profiler over 50
forwards with the tile search. One H200; writes the JSON named on the command line.

    python benchmarks/host_time_h200/host_probe.py out.json
"""

import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from neusdf.ops.knn import ensure_registered, knn_aggregate_aniso, knn_search_aniso
from neusdf.ops.testing import make_inputs

SIZES = {"tiny": (1, 64, 64, 8, 8), "reference": (2, 12288, 4096, 64, 16)}


def host_us(fn, n: int = 3000, rounds: int = 5) -> float:
    """Median over rounds of the host microseconds a call in a loop of n calls."""
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        res.append((t1 - t) / n * 1e6)
    return round(statistics.median(res), 2)


def event_ms(fn, sleep: bool) -> float:
    """Median ms of one call between CUDA events, optionally behind a sleeping kernel."""
    ts = []
    for _ in range(50):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep:
            torch.cuda._sleep(2_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return round(statistics.median(ts), 4)


def measure(size: str, B: int, Q: int, P: int, F: int, K: int) -> tuple[dict, dict]:
    ops = torch.ops.neusdf
    q, p, f, s, R = make_inputs(B, Q, P, F, device="cuda", seed=0)
    idx = ops.knn_search(q, p, s, R, K, "brute")
    x = torch.zeros(16, device="cuda")
    cases = {
        "aten add_": lambda: x.add_(1),
        "aten empty": lambda: torch.empty(B, Q, K, device="cuda", dtype=torch.long),
        "raw search brute": lambda: ops.knn_search(q, p, s, R, K, "brute"),
        "raw search tile": lambda: ops.knn_search(q, p, s, R, K, "tile"),
        "public search tile": lambda: knn_search_aniso(q, p, s, R, K, method="tile"),
        "public search auto": lambda: knn_search_aniso(q, p, s, R, K),
        "raw aggregate (idx)": lambda: ops.knn_aggregate(q, p, f, s, R, idx),
        "public aggregate (idx)": lambda: knn_aggregate_aniso(q, p, f, s, R, K, idx),
        "public aggregate tile": lambda: knn_aggregate_aniso(q, p, f, s, R, K, search="tile"),
    }
    n = 3000 if size == "tiny" else 300
    res = {k: host_us(fn, n=n) for k, fn in cases.items()}
    print(size, json.dumps(res, indent=1), flush=True)
    if size == "reference":
        for k in ("raw search tile", "public search tile", "public aggregate tile"):
            res[k + " events eager ms"] = event_ms(cases[k], False)
            res[k + " events queued ms"] = event_ms(cases[k], True)
        print(json.dumps(res, indent=1), flush=True)
    return res, cases


def main() -> None:
    ensure_registered()
    out = {}
    for size, dims in SIZES.items():
        out[size], cases = measure(size, *dims)
    fn = cases["public aggregate tile"]  # the reference size's
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    tab = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(tab)
    out["profile"] = tab
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
