"""Python face of the compiled anisotropic kNN aggregation: input checks and fake kernels.

The C++ library (``csrc/``) defines five ``torch.ops.neusdf`` operators: ``knn_search``,
``knn_search_ordered`` (the same search, with the order it visited the queries in),
``knn_aggregate``, ``knn_aggregate_backward`` and ``knn_aggregate_double_backward``, with their
autograd in C++ (``csrc/knn_aggregate_autograd.cpp``): the forward's backward is the backward
op, whose own backward is the double-backward op (exact for the upstream of the query gradient,
which the Eikonal loss produces; upstreams of the other gradients, rare, are differentiated
exactly through the formula on the gathered neighbours). A third derivative raises an error.
The search is exact whichever way it runs: brute force, a uniform grid or Morton-ordered tiles,
the last two pruning with a conservative distance bound (``method``; docs/op.md). This module
loads the library on first use and registers a fake (meta) kernel for each operator, so that
``torch.compile`` and ``torch.library.opcheck`` can trace them.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

__all__ = [
    "KnnAggregateResult",
    "SEARCH_METHODS",
    "knn_aggregate_aniso",
    "knn_search_aniso",
    "ensure_registered",
]


class KnnAggregateResult(NamedTuple):
    """What :func:`knn_aggregate_aniso` returns; unpacks like a plain 4-tuple."""

    f_out: torch.Tensor
    """(B, Q, F) summed features sum_k w_k f_k (not normalised)."""
    w: torch.Tensor
    """(B, Q, K) Gaussian weights exp(-D) of the neighbours."""
    dists: torch.Tensor
    """(B, Q, K) anisotropic squared distances D, ascending."""
    idx: torch.Tensor
    """(B, Q, K) int64 neighbour indices into P."""


_lock = threading.Lock()
_registered = False


SEARCH_METHODS = ("auto", "grid", "tile", "brute")
GRID_MAX_K_CUDA = 32  # the CUDA grid and tile searches keep each query's list in registers


def knn_search_aniso(
    q: torch.Tensor,
    p: torch.Tensor,
    sigma: torch.Tensor | None,
    R: torch.Tensor | None,
    K: int,
    *,
    method: str = "auto",
    check_values: bool | None = None,
    return_order: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The K nearest points of every query under the points' own anisotropic metrics.

    Args:
        q: (B, Q, 3) queries. p: (B, P, 3) points. sigma: (B, P, 3) per-axis precisions (> 0).
        R: (B, P, 3, 3) per-point axes (rows). All float32 or all float64, on one device.
            sigma and R both None: the Euclidean metric, the same result bit for bit as
            sigma = 1 and R = I (faster on CUDA, which then reads positions only).
        K: neighbours per query, 1 <= K <= P.
        method: ``"brute"`` scans every point; ``"grid"`` sorts the points into a uniform grid
            each call and visits cells in rings around the query, skipping cells with a
            conservative lower bound on the distance; ``"tile"`` sorts points and queries
            along a Morton curve and lets each group of queries (16 or 8 on CUDA, 32 on the
            CPU) skip the tiles of 32 points that the same kind of bound rules out (both exact:
            identical results; on CUDA for K <= 32); ``"auto"`` (default) takes brute force
            unless P is large enough for pruning to pay off and K is small against P, then the
            grid on the CPU and the tile search on CUDA (the CUDA grid is many times slower
            where the points lie on a surface and queries are far from it; docs/op.md).
        check_values: whether to check sigma > 0 (see :func:`knn_aggregate_aniso`); by
            default only tensors on the CPU are checked.
        return_order: also return the order in which the search visited the queries.

    Returns:
        idx (B, Q, K) int64, ascending in D = sum_j sigma_kj (R_k (q - p_k))_j^2, ties to the
        lower index; NaN distances sort last. Not differentiable. With ``return_order`` the
        tuple ``(idx, order)``: order (B * Q,) int64 is a permutation of the flat queries
        b * Q + i that puts queries near each other in space next to each other where the
        search sorted them (the tile search's Morton order and the grid's cell order on
        CUDA), else the identity. Passed with idx to :func:`knn_aggregate_aniso`, it makes
        the aggregation visit the queries in that order: the same results, and at large sizes
        much faster (docs/op.md, "The aggregation's visiting order").
    """
    _check_search(q, p, sigma, R, K, method)
    if not isinstance(return_order, bool):
        raise TypeError(f"return_order must be True or False, got {return_order!r}")
    if _wants_value_check(check_values, q) and sigma is not None:
        _check_values(sigma, None, p.shape[1])
    return _search(q, p, sigma, R, K, method, ordered=return_order)


def _search(q, p, sigma, R, K: int, method: str, *, ordered: bool = False):
    """The search op on checked inputs: idx, or with ``ordered`` the tuple (idx, order) of
    ``knn_search_ordered``. Their Autograd key falls through (csrc): the selection is piecewise
    constant and idx is an integer tensor, so no graph is recorded."""
    ensure_registered()
    if ordered:
        return torch.ops.neusdf.knn_search_ordered(q, p, sigma, R, K, method)
    return torch.ops.neusdf.knn_search(q, p, sigma, R, K, method)


def knn_aggregate_aniso(
    q: torch.Tensor,
    p: torch.Tensor,
    f: torch.Tensor,
    sigma: torch.Tensor,
    R: torch.Tensor,
    K: int,
    idx: torch.Tensor | None = None,
    *,
    order: torch.Tensor | None = None,
    search: str = "auto",
    check_values: bool | None = None,
) -> KnnAggregateResult:
    """Sums the features of each query's K nearest points, weighted by anisotropic Gaussians.

    For query q and point k: d = q - p_k, u = R_k d, D_k = sum_j sigma_kj u_j^2, w_k = exp(-D_k),
    and f_out = sum over the K points with the smallest D of w_k f_k (not normalised).

    Args:
        q: (B, Q, 3) query points.
        p: (B, P, 3) neural points.
        f: (B, P, F) point features.
        sigma: (B, P, 3) per-axis precisions (inverse squared scales), all > 0.
        R: (B, P, 3, 3) per-point axes, one per row; need not be orthonormal.
        K: neighbours per query, 1 <= K <= P.
        idx: optional (B, Q, K) int64 neighbours from an earlier call; skips the search and
            gives the same values and gradients as searching.
        order: optional (B * Q,) int64 visiting order of the given idx's queries, as
            ``knn_search_aniso(..., return_order=True)`` returns it: the same results, faster
            at large sizes (without idx the search's own order is used). It must be a
            permutation of [0, B * Q); checked with the values (``check_values``).
        search: the search method, ``"auto"``, ``"grid"``, ``"tile"`` or ``"brute"``
            (identical results; see :func:`knn_search_aniso`); ignored when idx is given.
        check_values: whether to check the values sigma > 0, idx in [0, P) and order a
            permutation. None
            (default): on CPU tensors only, where the check is free; on CUDA it needs a
            device synchronisation, which in a loop of eager calls leaves the GPU idle while
            the host launches the next work (0.1-0.2 ms per call on an H100, docs/op.md).
            True: on every device. False: never. Unchecked values are used as given: a
            sigma <= 0 makes its axis's term of D zero or negative (w may exceed 1; every
            search method still returns the same exact neighbours), a NaN sigma gives a NaN
            distance (sorted last), and an idx outside [0, P) NaN in that query's f_out, w
            and dists.

    All float tensors must share one dtype (float32 or float64) and one device (CPU or CUDA).

    Raises:
        TypeError, ValueError: for inputs that break the rules above, and (when checked)
        sigma <= 0, NaN sigma and idx values outside [0, P).

    Returns:
        A :class:`KnnAggregateResult` (a NamedTuple, so ``f_out, w, dists, idx = ...`` works):
        f_out (B, Q, F), w (B, Q, K), dists (B, Q, K), idx (B, Q, K) int64, neighbours ascending
        in D with ties to the lower index. f_out, w and dists are differentiable w.r.t. q, p, f,
        sigma and R (gradients flow through the selected neighbours), and the gradient w.r.t. q
        is differentiable again w.r.t. all of them.
    """
    _check_points(q, p, sigma, R)
    _check_features(f, q, p)
    _check_k(K, p.shape[1])
    if idx is not None:
        _check_idx(idx, q, K)
    else:
        _check_method(search, K, q)
    if order is not None:
        if idx is None:
            raise ValueError(
                "order is the visiting order of given neighbours: pass it together with idx "
                "(knn_search_aniso(..., return_order=True) returns both)"
            )
        _check_order(order, q)
    if _wants_value_check(check_values, q):
        _check_values(sigma, idx, p.shape[1], order)
    if idx is None:
        # The search's order of the queries (Morton order in the CUDA tile search) becomes the
        # order the aggregation kernels visit them in: queries that share neighbours then
        # share a block and its caches (docs/op.md, "The aggregation's visiting order").
        idx, order = _search(q, p, sigma, R, K, search, ordered=True)
    else:
        ensure_registered()
    f_out, w, dists = torch.ops.neusdf.knn_aggregate(q, p, f, sigma, R, idx, order)
    return KnnAggregateResult(f_out, w, dists, idx)


# ----------------------------------------------------------------------------- input checks
#
# The rules are written twice, on purpose: here for the public functions, and in C++
# (csrc/knn_aggregate.cpp, the same rules as listed in csrc/knn_aggregate.h) for the raw
# torch.ops.neusdf operators. The C++ checks keep the kernels memory-safe for any caller of
# the raw ops. These Python checks (1) raise TypeError / ValueError with messages in the
# caller's terms before anything is built or dispatched, (2) run when torch.compile traces the
# op (the fake kernels below call them; a C++ check never runs on fake tensors), and (3) hold
# the rules on values that need a reduction of device data (sigma > 0, idx in range), which the
# C++ kernels do not check because on CUDA that costs a device synchronisation per call.


def _check_tensor(t: object, name: str, rank: int, trailing: tuple[int, ...]) -> None:
    # Runs on every call: the message is only built on failure.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank or t.shape[rank - len(trailing) :] != trailing:
        dims = ", ".join(["Q" if name == "q" else "P"] + [str(s) for s in trailing])
        raise ValueError(f"{name} must have shape (B, {dims}), got {tuple(t.shape)}")


def _check_float(t: torch.Tensor, name: str, q: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; use one dtype for all")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; use one device")


def _check_points(q, p, sigma, R, *, euclidean_ok: bool = False) -> None:
    """Shapes, dtypes and devices; ``euclidean_ok``: sigma and R may both be None (the search's
    Euclidean metric)."""
    _check_tensor(q, "q", 3, (3,))
    _check_tensor(p, "p", 3, (3,))
    metric = ((sigma, "sigma"), (R, "R"))
    if euclidean_ok and (sigma is None or R is None):
        if sigma is not None or R is not None:
            raise ValueError("pass sigma and R together, or neither (the Euclidean metric)")
        metric = ()
    else:
        _check_tensor(sigma, "sigma", 3, (3,))
        _check_tensor(R, "R", 4, (3, 3))
    for t, name in ((q, "q"), (p, "p"), *metric):
        _check_float(t, name, q)
    B, P = q.shape[0], p.shape[1]
    if p.shape[0] != B:
        raise ValueError(f"p has batch size {p.shape[0]} but q has {B}")
    for t, name in metric:
        if t.shape[0] != B or t.shape[1] != P:
            raise ValueError(
                f"{name} must have (B, P) = ({B}, {P}) like q and p, got {tuple(t.shape)}"
            )


def _check_search(q, p, sigma, R, K, method) -> None:
    """The search's arguments (sigma and R may both be None: the Euclidean metric)."""
    _check_points(q, p, sigma, R, euclidean_ok=True)
    _check_k(K, p.shape[1])
    _check_method(method, K, q)


def _check_features(f, q: torch.Tensor, p: torch.Tensor) -> None:
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f must be a torch.Tensor, got {type(f).__name__}")
    if f.dim() != 3 or f.shape[0] != q.shape[0] or f.shape[1] != p.shape[1]:
        raise ValueError(
            f"f must have shape (B, P, F) with (B, P) = ({q.shape[0]}, {p.shape[1]}), "
            f"got {tuple(f.shape)}"
        )
    _check_float(f, "f", q)


def _check_k(K, P: int) -> None:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K must be an int, got {type(K).__name__}")
    if not 1 <= K <= P:
        raise ValueError(f"K must satisfy 1 <= K <= P = {P}, got K = {K}")


def _check_method(method, K: int, q: torch.Tensor) -> None:
    if method not in SEARCH_METHODS:
        raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {method!r}")
    if method in ("grid", "tile") and q.device.type == "cuda" and K > GRID_MAX_K_CUDA:
        raise ValueError(
            f"the {method} search supports K <= {GRID_MAX_K_CUDA} on CUDA, got K = {K}; "
            "use 'auto' or 'brute'"
        )


def _check_index_tensor(t, name: str, q: torch.Tensor, expected: tuple, dims: str) -> None:
    """t is an int64 tensor of shape ``expected`` (written ``dims``) on q's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {dims} = {expected}, got {tuple(t.shape)}")


def _check_idx(idx, q: torch.Tensor, K: int) -> None:
    _check_index_tensor(idx, "idx", q, (q.shape[0], q.shape[1], K), "(B, Q, K)")


def _check_order(order, q: torch.Tensor) -> None:
    _check_index_tensor(order, "order", q, (q.shape[0] * q.shape[1],), "(B * Q,)")


def _wants_value_check(check_values: bool | None, q: torch.Tensor) -> bool:
    """Whether :func:`_check_values` runs: as asked, or by default where it needs no device
    synchronisation (tensors on the CPU; q's device is every input's, checked before)."""
    if check_values is None:
        return not q.is_cuda
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values must be True, False or None, got {check_values!r}")
    return check_values


def _check_values(
    sigma: torch.Tensor, idx: torch.Tensor | None, P: int, order: torch.Tensor | None = None
) -> None:
    """sigma > 0 everywhere, idx (if given) in [0, P) and order (if given) a permutation of
    [0, B * Q): one read of the reductions' results (a device synchronisation on CUDA).

    Why sigma must be positive: sigma are precisions (inverse squared scales). Zero is an
    infinitely wide axis and a negative one no Gaussian at all (D < 0, w = exp(-D) > 1 and
    unbounded). The grid and tile searches' pruning bound covers only points with sigma > 0;
    they scan the others for every query, so unchecked values stay exact, only slower.
    Skipped while torch.compile traces (data-dependent) and while a CUDA graph is being
    captured (a device-to-host read is not allowed there; a replay runs no Python at all, so
    the eager calls before the capture are where the values get checked). The kernels never
    read out of bounds: a bad index gives NaN outputs, an order value out of range an idle slot.
    """
    if torch.compiler.is_compiling() or sigma.numel() == 0:
        return
    if sigma.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    has_idx = idx is not None and idx.numel() > 0
    has_order = order is not None and order.numel() > 0
    flags = [(sigma > 0).all().to(torch.int64)]
    if has_idx:
        flags += list(torch.aminmax(idx))
    if has_order:
        n = order.numel()
        inside = ((order >= 0) & (order < n)).all()
        once = torch.bincount(order.clamp(0, n - 1), minlength=n).eq(1).all()
        flags.append((inside & once).to(torch.int64))
    values = torch.stack(flags).tolist()
    if not values[0]:
        raise ValueError(_bad_sigma(sigma))
    if has_idx and (values[1] < 0 or values[2] >= P):
        raise ValueError(
            f"idx must hold point indices in [0, P) = [0, {P}), got values in "
            f"[{values[1]}, {values[2]}]"
        )
    if has_order and not values[-1]:
        raise ValueError(
            f"order must be a permutation of [0, B * Q) = [0, {order.numel()}): each flat "
            "query index exactly once"
        )


def _bad_sigma(sigma: torch.Tensor) -> str:
    return (
        f"sigma must be > 0 everywhere (precisions, inverse squared scales), got minimum "
        f"{sigma.min().item():.6g}" + (" and NaN values" if bool(torch.isnan(sigma).any()) else "")
    )


# ----------------------------------------------------------------- registration and autograd


def ensure_registered() -> None:
    """Loads the compiled library and registers fake kernels and autograd (once per process)."""
    global _registered
    if _registered:  # the common case, without taking the lock
        return
    with _lock:
        if _registered:
            return
        # Imported here so that `python -m neusdf.ops.build` does not import itself twice.
        from neusdf.ops.build import load_library

        load_library()
        _register_fakes()
        _registered = True


def _register_fakes() -> None:
    # Like the real kernels: the same checks (shape rules; values need data) and fresh
    # contiguous outputs, whatever the inputs' strides.
    def fresh(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty(t.shape)

    @torch.library.register_fake("neusdf::knn_search")
    def _(q, p, sigma, R, K, method="auto"):
        _check_search(q, p, sigma, R, K, method)
        return q.new_empty((q.shape[0], q.shape[1], K), dtype=torch.int64)

    @torch.library.register_fake("neusdf::knn_search_ordered")
    def _(q, p, sigma, R, K, method="auto"):
        _check_search(q, p, sigma, R, K, method)
        B, Q = q.shape[0], q.shape[1]
        return q.new_empty((B, Q, K), dtype=torch.int64), q.new_empty(B * Q, dtype=torch.int64)

    @torch.library.register_fake("neusdf::knn_aggregate")
    def _(q, p, f, sigma, R, idx, order=None):
        _check_aggregate(q, p, f, sigma, R, idx, order)
        B, Q, K = idx.shape
        return q.new_empty((B, Q, f.shape[2])), q.new_empty((B, Q, K)), q.new_empty((B, Q, K))

    @torch.library.register_fake("neusdf::knn_aggregate_backward")
    def _(gf, gw, gD, q, p, f, sigma, R, idx, order=None):
        _check_aggregate(q, p, f, sigma, R, idx, order)
        return tuple(fresh(t) for t in (q, p, f, sigma, R))

    @torch.library.register_fake("neusdf::knn_aggregate_double_backward")
    def _(ggq, gf, gw, gD, q, p, f, sigma, R, idx, order=None):
        _check_aggregate(q, p, f, sigma, R, idx, order)
        upstream = tuple(q.new_empty(0) if g is None else fresh(g) for g in (gf, gw, gD))
        return (*upstream, *(fresh(t) for t in (q, p, f, sigma, R)))


def _check_aggregate(q, p, f, sigma, R, idx, order=None) -> None:
    """The shape and dtype rules of the aggregation operators (for the fake kernels)."""
    _check_points(q, p, sigma, R)
    _check_features(f, q, p)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3:
        raise ValueError(f"idx must have shape (B, Q, K), got {getattr(idx, 'shape', idx)}")
    _check_idx(idx, q, idx.shape[2])
    if order is not None:
        _check_order(order, q)
