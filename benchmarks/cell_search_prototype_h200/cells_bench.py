"""Checks and times the prototype cell search (method "cells") against brute force and "tile".

Needs the prototype applied first (``git apply`` of ``cell_search_v1.patch`` or
``cell_search_v2.patch`` in this folder, against commit 702b427) and a CUDA GPU. ``adv``
compares "cells" with brute force on every adversarial case of ``make_search_case`` (float32
and float64, five sizes each); ``time`` times "tile" and "cells" as CUDA-graph replays on the
cases of ``benchmarks/tile_cases.py`` and checks their indices (against brute force up to
P = 65536). ``NEUSDF_CELL_PPC`` sets the cells' size (points a cell, rounded to a power of 8).

    NEUSDF_CELL_PPC=8 python benchmarks/cell_search_prototype_h200/cells_bench.py out.json time
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search_crossover import graph_ms, inputs  # noqa: E402
from tile_cases import CASES  # noqa: E402

from neusdf.ops.knn import ensure_registered  # noqa: E402
from neusdf.ops.testing import SEARCH_CASES, make_search_case  # noqa: E402

ADV_SIZES = (
    (2, 700, 3000, 16),
    (1, 300, 20, 20),
    (1, 2000, 9000, 5),
    (2, 64, 64, 32),
    (1, 257, 5000, 1),
)


def main() -> int:
    ensure_registered()
    search = torch.ops.neusdf.knn_search
    path, mode = Path(sys.argv[1]), sys.argv[2]
    out: dict = {"ppc": os.environ.get("NEUSDF_CELL_PPC", "2"), "rows": [], "adv": []}
    if mode in ("adv", "all"):
        bad = 0
        for kind in SEARCH_CASES:
            for dtype in (torch.float32, torch.float64):
                for B, Q, P, K in ADV_SIZES:
                    q, p, s, R = make_search_case(kind, B, Q, P, dtype=dtype, device="cuda", seed=3)
                    a, c = search(q, p, s, R, K, "brute"), search(q, p, s, R, K, "cells")
                    if not torch.equal(a, c):
                        bad += 1
                        out["adv"].append(dict(kind=kind, dtype=str(dtype), B=B, Q=Q, P=P, K=K))
        print("adversarial mismatches:", bad, flush=True)
        out["adv_bad"] = bad
    if mode in ("time", "all"):
        for dist, B, Q, P, K in CASES:
            q, p, s, R = inputs(dist, P, Q, batches=B)
            row = dict(dist=dist, B=B, Q=Q, P=P, K=K)
            args = (q, p, s, R, K)
            for m in ("tile", "cells"):
                row[m] = round(graph_ms(lambda m=m, args=args: search(*args, m)), 4)
            c = search(q, p, s, R, K, "cells")
            row["cells_eq_tile"] = torch.equal(c, search(q, p, s, R, K, "tile"))
            if P <= 65536:
                row["cells_eq_brute"] = torch.equal(c, search(q, p, s, R, K, "brute"))
            print(row, flush=True)
            out["rows"].append(row)
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
