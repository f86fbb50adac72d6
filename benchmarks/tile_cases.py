"""The tile search on fixed cases, for comparing two builds of its kernel.

For each case (the op benchmark's reference, training and P = 65536 sizes on the cube and the
sphere inputs of ``search_crossover.py``, and two larger ones) times
``torch.ops.neusdf.knn_search(..., "tile")`` as a CUDA-graph replay (the GPU time alone, median
of 9 replays of 10 calls), hashes its indices (so that two builds' rows can be checked to
return the same neighbours) and, up to P = 65536, checks them against brute force. Run it under
each build (its own ``TORCH_EXTENSIONS_DIR`` and checkout on ``PYTHONPATH``), alternating, then
compare the JSON files.

    python benchmarks/tile_cases.py tile_cases.json --label head
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_crossover import graph_ms, inputs  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402
from neusdf.ops.knn import ensure_registered  # noqa: E402

# (distribution, B, Q, P, K)
CASES = [
    ("cube", 2, 12288, 4096, 16),
    ("cube", 1, 32768, 16384, 8),
    ("cube", 2, 12288, 65536, 16),
    ("sphere", 2, 12288, 4096, 16),
    ("sphere", 1, 32768, 16384, 8),
    ("sphere", 2, 12288, 65536, 16),
    ("cube", 1, 262144, 1048576, 16),
    ("sphere", 1, 131072, 262144, 16),
]
BRUTE_MAX_P = 65536  # brute force beyond this takes seconds a case


def measure(dist: str, B: int, Q: int, P: int, K: int) -> dict:
    """Graph ms, index hash and agreement with brute force of one case."""
    q, p, sigma, R = inputs(dist, P, Q, batches=B)
    search = torch.ops.neusdf.knn_search
    ms = graph_ms(lambda: search(q, p, sigma, R, K, "tile"))
    idx = search(q, p, sigma, R, K, "tile")
    weights = torch.arange(1, K + 1, device=idx.device)
    equal = None
    if P <= BRUTE_MAX_P:
        equal = bool(torch.equal(idx, search(q, p, sigma, R, K, "brute")))
    row = {"dist": dist, "B": B, "Q": Q, "P": P, "K": K, "ms": ms}
    return {**row, "index_hash": int((idx * weights).sum()), "equal_brute": equal}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    ap.add_argument("--label", default="", help="a name for this build, kept in the JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the tile search's CUDA kernel)")
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    ensure_registered()
    rows = []
    for case in CASES:
        rows.append(measure(*case))
        print(rows[-1], flush=True)
    payload = {"device": torch.cuda.get_device_name(), "label": args.label, "rows": rows}
    write_json(args.json, payload, overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
