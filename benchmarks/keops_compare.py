"""The op's neighbour search against KeOps's, at the op benchmark's sizes.

KeOps (``pykeops``) is the usual tool for a kNN under a custom metric: it compiles a brute-force
reduction over every (query, point) pair. Its form of the op's metric is
``x_i.weightedsqdist(y_j, M_j).argKmin(K)`` with M = R^T diag(sigma) R, the point's full 3 x 3
precision matrix (KeOps's anisotropic Gaussian kernels take this form). For each size of
``neusdf.ops.benchmark`` (the same inputs, ``make_inputs(seed=0)``) this times eager calls, like
the op benchmark (median of ``--reps`` after warm-up; CUDA events, or wall clock on the CPU):

- ``neusdf``: ``knn_search_aniso(q, p, sigma, R, K)`` (method "auto");
- ``keops``: the KeOps search above;
- ``neusdf euclidean`` / ``keops euclidean``: the Euclidean metric (``sigma = R = None``; KeOps's
  ``sqdist``).

KeOps computes D from M in float32 in another order than the op does (from R and sigma), so its
neighbours can differ where two keys are within rounding of each other. The agreement columns
say how often: the share of queries whose K indices equal the op's, in order, and the largest
relative excess of KeOps's K-th key over the op's, both keys recomputed in float64 with the
op's formula (0 where KeOps's list is as good as the op's).

Needs the ``bench`` extra's ``pykeops`` (its first call per formula compiles for some seconds,
before the timed calls), and on CUDA a KeOps that can compile for the GPU (on the GPU machine's
image of 2026-11-29, CUDA 13.0, KeOps 2.3 crashed compiling any formula, its own
``pykeops.test_torch_bindings()`` too, so no CUDA row has been measured).

    python benchmarks/keops_compare.py keops.json
    python benchmarks/keops_compare.py keops.json --size reference --size P=65536
    python benchmarks/keops_compare.py keops_cpu.json --device cpu --small
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from neusdf.ops.benchmark import SIZES, SMALL_SIZES, call_times, write_json
from neusdf.ops.knn import knn_search_aniso
from neusdf.ops.reference import euclidean_metric, knn_aggregate_aniso_reference
from neusdf.ops.testing import make_inputs


def keops_search(q, p, M, K: int) -> torch.Tensor:
    """(B, Q, K) int64: KeOps's K nearest under d^T M_j d, d = q - p_j (M: (B, P, 9) float32,
    row-major), or under the Euclidean metric if M is None."""
    from pykeops.torch import LazyTensor

    x = LazyTensor(q[:, :, None, :])
    y = LazyTensor(p[:, None, :, :])
    d = x.sqdist(y) if M is None else x.weightedsqdist(y, LazyTensor(M[:, None, :, :]))
    return d.argKmin(K, dim=2).long()


def exact_keys(q, p, sigma, R, idx) -> torch.Tensor:
    """(B, Q, K) float64 keys of the points idx names, by the plain-PyTorch reference's formula
    sum_j sigma_j (R (q - p))_j^2 (sigma = 1 and R = I if sigma is None)."""
    if sigma is None:
        sigma, R = euclidean_metric(p)
    q, p, sigma, R = (t.double() for t in (q, p, sigma, R))
    features = p.new_zeros(p.shape[0], p.shape[1], 1)  # the reference wants some; unused
    return knn_aggregate_aniso_reference(q, p, features, sigma, R, idx.shape[2], idx).dists


def agreement(q, p, sigma, R, ours, theirs) -> dict:
    """Share of queries with identical index lists, and KeOps's worst relative K-th key excess."""
    same = (ours == theirs).all(-1).double().mean().item()
    k_ours = exact_keys(q, p, sigma, R, ours)[..., -1]
    k_theirs = exact_keys(q, p, sigma, R, theirs)[..., -1]
    excess = ((k_theirs - k_ours) / k_ours.clamp_min(1e-300)).clamp_min(0).max().item()
    return {"same_lists": round(same, 6), "kth_key_excess": excess}


def measure(name: str, dims: tuple, device: str, warmup: int, reps: int) -> dict:
    """One size's row: both searches under both metrics, timed, and their agreement."""
    B, Q, P, _, K = dims
    q, p, _, sigma, R = make_inputs(B, Q, P, 1, device=device, seed=0)
    M = (R.transpose(-1, -2) @ (sigma[..., None] * R)).reshape(B, P, 9).contiguous()
    row: dict = {"size": name, "B": B, "Q": Q, "P": P, "K": K}
    for metric, s, r, m in (("", sigma, R, M), (" euclidean", None, None, None)):
        # the first calls also compile KeOps's formula, outside the timed calls
        ours = knn_search_aniso(q, p, s, r, K)
        theirs = keops_search(q, p, m, K)
        calls = {
            "neusdf": lambda s=s, r=r: knn_search_aniso(q, p, s, r, K),
            "keops": lambda m=m: keops_search(q, p, m, K),
        }
        for impl, fn in calls.items():
            ts = call_times(device, fn, warmup, reps)
            row[f"{impl}{metric} ms"] = round(statistics.median(ts), 4)
        row[f"keops{metric} / neusdf"] = round(
            row[f"keops{metric} ms"] / row[f"neusdf{metric} ms"], 2
        )
        for key, value in agreement(q, p, s, r, ours, theirs).items():
            row[f"{key}{metric}"] = value
        print(row, flush=True)
    return row


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| size (B, Q, P, K) | neusdf ms | KeOps ms | KeOps / neusdf | same lists "
        "| Euclidean: neusdf ms | KeOps ms | KeOps / neusdf | same lists |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} ({r['B']}, {r['Q']}, {r['P']}, {r['K']}) | {r['neusdf ms']:.3f} "
            f"| {r['keops ms']:.3f} | {r['keops / neusdf']:.1f}x | {r['same_lists']:.4f} "
            f"| {r['neusdf euclidean ms']:.3f} | {r['keops euclidean ms']:.3f} "
            f"| {r['keops euclidean / neusdf']:.1f}x | {r['same_lists euclidean']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="where to write the results")
    ap.add_argument("--size", action="append", choices=list(SIZES), help="default: all")
    ap.add_argument("--small", action="store_true", help=f"only {SMALL_SIZES} (for the CPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    try:
        import pykeops
    except ImportError:
        print('keops_compare.py needs pykeops: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    import pykeops.config

    if args.device == "cuda" and not pykeops.config.gpu_available:  # it would use the CPU
        print("KeOps found no usable CUDA (headers, nvrtc); see its log above", file=sys.stderr)
        return 2
    sizes = SMALL_SIZES if args.small else {n: SIZES[n] for n in args.size or SIZES}
    rows = [measure(n, dims, args.device, args.warmup, args.reps) for n, dims in sizes.items()]
    print(table(rows))
    payload = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pykeops": pykeops.__version__,
        "rows": rows,
    }
    write_json(args.json, payload, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
