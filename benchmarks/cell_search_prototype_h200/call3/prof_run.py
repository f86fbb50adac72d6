"""One "tile" and one "cells" search on three cases, the program that call 3 profiled.

With cell_search_v1.patch applied (see ../README.md), under Nsight Compute:

    NEUSDF_CELL_PPC=8 ncu --clock-control none \\
        --kernel-name regex:"knn_(cell|tile)_search_kernel" --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section InstructionStats --csv --page details \\
        python benchmarks/cell_search_prototype_h200/call3/prof_run.py > ncu_details.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from search_crossover import inputs  # noqa: E402
from tile_cases import CASES as TILE_CASES  # noqa: E402

from neusdf.ops.knn import ensure_registered  # noqa: E402

CASES = (TILE_CASES[0], TILE_CASES[2], TILE_CASES[4])  # cube reference, P = 65536; sphere training


def main() -> int:
    ensure_registered()
    search = torch.ops.neusdf.knn_search
    for dist, B, Q, P, K in CASES:
        q, p, s, R = inputs(dist, P, Q, batches=B)
        for method in ("tile", "cells"):
            search(q, p, s, R, K, method)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
