"""Times the fixed-gate search prototype (``fixed_gate.cu``) against the op's tile search.

For each case of ``benchmarks/tile_cases.py`` up to P = 65536 (float32, orthonormal axes) it
prepares the prototype's inputs with PyTorch (Morton order, tiles of 32, chunks of 32 tiles,
the expanded quadratic form of each point about its tile's centre; not timed, the op's own
build does this work in about 20 us at the reference size), runs the prototype's three kernels
(gate, filter, select), checks that its indices equal the op's ``"tile"`` search, and times
both as CUDA-graph replays (``graph_ms``): the op's search (its build and its kernel) and the
prototype's kernels (the counters' zeroing included). Per-kernel times come from
``torch.profiler`` (``--profile``). Needs a CUDA GPU; the prototype compiles on first use.

    python benchmarks/fixed_gate_prototype/fixed_gate_bench.py out.json [--profile prof.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from search_crossover import graph_ms, inputs  # noqa: E402
from tile_cases import CASES  # noqa: E402
from tile_skip_model import chunk_boxes, morton_batch  # noqa: E402

from neusdf.ops.benchmark import write_json  # noqa: E402
from neusdf.ops.knn import ensure_registered  # noqa: E402

TILE, GROUP, HOME = 32, 16, 256


def prepare(q, p, sigma, R, cap: int) -> dict:
    """The prototype's sorted inputs and buffers (see fixed_gate.cu for the layouts): each
    batch sorted and cut into tiles by ``tile_skip_model.morton_batch`` (float64, on the CPU),
    then the kernels' records, in float32 on q's device."""
    B, Q, P = q.shape[0], q.shape[1], p.shape[1]
    if P % TILE or P < HOME:
        raise ValueError(f"P must be a multiple of {TILE} and at least {HOME}, got {P}")
    parts = [morton_batch(*(t[b].cpu() for t in (q, p, sigma, R)), TILE) for b in range(B)]
    chunks = [chunk_boxes(part["tlo"], part["thi"], part["tlam"]) for part in parts]

    def stack(key: str) -> torch.Tensor:
        return torch.stack([part[key] for part in parts])

    T, G = P // TILE, (Q + GROUP - 1) // GROUP
    ps, qs, M = stack("p"), stack("q"), stack("M")
    shave = 1 - 1e-4  # lam's margin for the float32 keys' rounding
    bound = stack("sigma").amax(-1) * (stack("R") ** 2).sum((-1, -2))
    tp = ps.view(B, T, TILE, 3)
    tlo, thi = stack("tlo"), stack("thi")
    cen = ((tlo + thi) / 2).float().double()  # the centre the kernel subtracts, exactly
    rel = tp - cen[:, :, None]
    r = rel.abs().sum(-1).amax(-1)
    Mt = M.view(B, T, TILE, 3, 3)
    Mp = (Mt @ rel[..., None])[..., 0]
    pMp = (rel * Mp).sum(-1)
    zero = torch.zeros_like(pMp)
    psi = torch.stack(
        [
            Mt[..., 0, 0], Mt[..., 1, 1], Mt[..., 2, 2], 2 * Mt[..., 0, 1],
            2 * Mt[..., 0, 2], 2 * Mt[..., 1, 2], -2 * Mp[..., 0], -2 * Mp[..., 1],
            -2 * Mp[..., 2], pMp, zero, zero,
        ],
        -1,
    )  # fmt: skip
    tlam = stack("tlam") * shave
    tb = bound.view(B, T, TILE).amax(-1)
    tbox = torch.stack(
        [torch.cat([tlo, tlam[..., None]], -1), torch.cat([thi, tb[..., None]], -1)], 2
    )
    clo, chi, clam = (torch.stack(c) for c in zip(*chunks, strict=True))
    cbox = torch.stack(
        [torch.cat([clo, clam[..., None] * shave], -1), torch.cat([chi, 0 * clam[..., None]], -1)],
        2,
    )
    qpad = torch.cat([qs, qs[:, -1:].expand(B, G * GROUP - Q, 3)], 1).view(B, G, GROUP, 3)
    glo, ghi = qpad.amin(2), qpad.amax(2)
    gbox = torch.stack(
        [torch.cat([glo, 0 * glo[..., :1]], -1), torch.cat([ghi, 0 * ghi[..., :1]], -1)], 2
    )
    middle = torch.clamp(torch.arange(G) * GROUP + GROUP // 2, max=Q - 1)
    at = torch.searchsorted(stack("pc"), stack("qc")[:, middle].contiguous())
    home = (at - HOME // 2).clamp(0, P - HOME).int()
    shape = torch.cat([stack("sigma"), stack("R").flatten(2), zero.view(B, P, 1)], -1)
    f32 = dict(dtype=torch.float32, device=q.device)
    return {
        "q": qs.to(**f32).contiguous(),
        "rec": torch.cat([ps, shape], -1).to(**f32).contiguous(),
        "home": home.to(q.device).contiguous(), "psi": psi.to(**f32).contiguous(),
        "tbox": tbox.to(**f32).contiguous(),
        "tcen": torch.cat([cen, r[..., None]], -1).to(**f32).contiguous(),
        "cbox": cbox.to(**f32).contiguous(), "gbox": gbox.to(**f32).contiguous(),
        "pperm": stack("po").int().to(q.device).contiguous(),
        "qperm": stack("qo").to(q.device).contiguous(),
        "gate": torch.empty(B, Q, **f32),
        "counts": torch.zeros(B, Q, dtype=torch.int32, device=q.device),
        "buf": torch.empty(B, Q, cap, dtype=torch.int32, device=q.device),
    }  # fmt: skip


def build():
    """The prototype's extension module (compiled on first use, cached by torch)."""
    return load(
        "fixed_gate_proto",
        [str(HERE / "fixed_gate.cu")],
        extra_include_paths=[str(HERE.parents[1] / "csrc")],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
    )


def measure(ext, dist: str, B: int, Q: int, P: int, K: int, cap: int, profile: bool):
    """One case's row (indices against the op's, buffers, graph ms) and, with ``profile``,
    torch.profiler's kernel table (else "")."""
    search = torch.ops.neusdf.knn_search
    q, p, sigma, R = inputs(dist, P, Q, batches=B)
    a = prepare(q, p, sigma, R, cap)
    out_idx = torch.empty(B, Q, K, dtype=torch.long, device=q.device)
    out_key = torch.empty(B, Q, K, device=q.device)
    overflow = torch.zeros(1, dtype=torch.int32, device=q.device)
    tensors = [a[k] for k in ("q", "rec", "home", "psi", "tbox", "tcen")]
    tensors += [a[k] for k in ("cbox", "gbox", "pperm", "qperm", "gate", "counts", "buf")]

    def proto(stages: int = 7) -> None:
        if stages & 2:
            a["counts"].zero_()
        ext.run(*tensors, out_idx, out_key, overflow, K, stages)

    def tile() -> torch.Tensor:
        return search(q, p, sigma, R, K, "tile")

    proto()
    ref = tile()
    counts = a["counts"].double()
    row = {
        "dist": dist, "B": B, "Q": Q, "P": P, "K": K,
        "equal_tile": bool(torch.equal(out_idx, ref)),
        "mismatched_queries": int((out_idx != ref).any(-1).sum()),
        "overflow": int(overflow.item()),
        "buffer_mean": float(counts.mean()), "buffer_p99": float(counts.quantile(0.99)),
        "buffer_max": float(counts.max()),
        "tile_ms": graph_ms(tile),
        "proto_ms": graph_ms(proto),
        "gate_ms": graph_ms(lambda: proto(1)),
        "filter_ms": graph_ms(lambda: proto(2)),
        "select_ms": graph_ms(lambda: proto(4)),
    }  # fmt: skip
    print(row, flush=True)
    if not profile:
        return row, ""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            tile()
            proto()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=12)
    return row, f"{dist} B={B} Q={Q} P={P} K={K}\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="output JSON (written atomically)")
    ap.add_argument("--profile", type=Path, help="write torch.profiler's kernel table here")
    ap.add_argument("--cap", type=int, default=8192, help="buffer places a query")
    ap.add_argument("--cases", help="comma list of indices into tile_cases.CASES (default: all)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    args = ap.parse_args(argv)
    picked = range(len(CASES)) if args.cases is None else [int(i) for i in args.cases.split(",")]
    if args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    ensure_registered()
    ext = build()
    rows, tables = [], []
    for dist, B, Q, P, K in (CASES[i] for i in picked):
        if P <= 65536:
            row, table = measure(ext, dist, B, Q, P, K, args.cap, args.profile is not None)
            rows.append(row)
            tables.append(table)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    write_json(args.json, record, overwrite=args.overwrite)
    if args.profile:
        args.profile.write_text("\n".join(tables))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
