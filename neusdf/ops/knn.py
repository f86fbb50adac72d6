"""Python face of the compiled anisotropic kNN aggregation: input checks and fake kernels.

The C++ library (``csrc/``) defines four ``torch.ops.neusdf`` operators: ``knn_search``,
``knn_aggregate``, ``knn_aggregate_backward`` and ``knn_aggregate_double_backward``, with their
autograd in C++ (``csrc/knn_aggregate_autograd.cpp``): the forward's backward is the backward
op, whose own backward is the double-backward op (exact for the upstream of the query gradient,
which the Eikonal loss produces; upstreams of the other gradients, rare, are differentiated
exactly through the formula on the gathered neighbours). A third derivative raises an error.
This module loads the library on first use and registers a fake (meta) kernel for each
operator, so that ``torch.compile`` and ``torch.library.opcheck`` can trace them.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["knn_aggregate_aniso", "knn_search_aniso", "ensure_registered"]

_lock = threading.Lock()
_registered = False


def knn_search_aniso(
    q: torch.Tensor, p: torch.Tensor, sigma: torch.Tensor, R: torch.Tensor, K: int
) -> torch.Tensor:
    """The K nearest points of every query under the points' own anisotropic metrics.

    Args:
        q: (B, Q, 3) queries. p: (B, P, 3) points. sigma: (B, P, 3) per-axis precisions.
        R: (B, P, 3, 3) per-point axes (rows). All float32 or all float64, on one device.
        K: neighbours per query, 1 <= K <= P.

    Returns:
        idx (B, Q, K) int64, ascending in D = sum_j sigma_kj (R_k (q - p_k))_j^2, ties to the
        lower index; NaN distances sort last. Not differentiable.
    """
    _check_points(q, p, sigma, R)
    _check_k(K, p.shape[1])
    return _search(q, p, sigma, R, K)


def _search(q, p, sigma, R, K: int) -> torch.Tensor:
    """The search op on checked inputs. Its Autograd key falls through (csrc): the selection
    is piecewise constant and idx is an integer tensor, so no graph is recorded."""
    ensure_registered()
    return torch.ops.neusdf.knn_search(q, p, sigma, R, K)


def knn_aggregate_aniso(
    q: torch.Tensor,
    p: torch.Tensor,
    f: torch.Tensor,
    sigma: torch.Tensor,
    R: torch.Tensor,
    K: int,
    idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums the features of each query's K nearest points, weighted by anisotropic Gaussians.

    For query q and point k: d = q - p_k, u = R_k d, D_k = sum_j sigma_kj u_j^2, w_k = exp(-D_k),
    and f_out = sum over the K points with the smallest D of w_k f_k (not normalised).

    Args:
        q: (B, Q, 3) query points.
        p: (B, P, 3) neural points.
        f: (B, P, F) point features.
        sigma: (B, P, 3) per-axis precisions (inverse squared scales), expected > 0.
        R: (B, P, 3, 3) per-point axes, one per row; need not be orthonormal.
        K: neighbours per query, 1 <= K <= P.
        idx: optional (B, Q, K) int64 neighbours from an earlier call; skips the search and
            gives the same values and gradients as searching.

    All float tensors must share one dtype (float32 or float64) and one device (CPU or CUDA).

    Returns:
        f_out (B, Q, F), w (B, Q, K), dists (B, Q, K), idx (B, Q, K) int64, neighbours ascending
        in D with ties to the lower index. f_out, w and dists are differentiable w.r.t. q, p, f,
        sigma and R (gradients flow through the selected neighbours), and the gradient w.r.t. q
        is differentiable again w.r.t. all of them.
    """
    _check_points(q, p, sigma, R)
    _check_features(f, q, p)
    _check_k(K, p.shape[1])
    if idx is None:
        idx = _search(q, p, sigma, R, K)
    else:
        _check_idx(idx, q, p, K)
        ensure_registered()
    f_out, w, dists = torch.ops.neusdf.knn_aggregate(q, p, f, sigma, R, idx)
    return f_out, w, dists, idx


# ----------------------------------------------------------------------------- input checks


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


def _check_points(q, p, sigma, R) -> None:
    _check_tensor(q, "q", 3, (3,))
    _check_tensor(p, "p", 3, (3,))
    _check_tensor(sigma, "sigma", 3, (3,))
    _check_tensor(R, "R", 4, (3, 3))
    for t, name in ((q, "q"), (p, "p"), (sigma, "sigma"), (R, "R")):
        _check_float(t, name, q)
    B, P = q.shape[0], p.shape[1]
    if p.shape[0] != B:
        raise ValueError(f"p has batch size {p.shape[0]} but q has {B}")
    for t, name in ((sigma, "sigma"), (R, "R")):
        if t.shape[0] != B or t.shape[1] != P:
            raise ValueError(
                f"{name} must have (B, P) = ({B}, {P}) like q and p, got {tuple(t.shape)}"
            )


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


def _check_idx(idx, q: torch.Tensor, p: torch.Tensor, K: int) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor or None, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if idx.device != q.device:
        raise ValueError(f"idx is on {idx.device} but q is on {q.device}")
    expected = (q.shape[0], q.shape[1], K)
    if tuple(idx.shape) != expected:
        raise ValueError(f"idx must have shape (B, Q, K) = {expected}, got {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one reduction, one device sync
        if lo < 0 or hi >= p.shape[1]:
            raise ValueError(
                f"idx must hold point indices in [0, P) = [0, {p.shape[1]}), got values in "
                f"[{lo}, {hi}]"
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
    @torch.library.register_fake("neusdf::knn_search")
    def _(q, p, sigma, R, K):
        return q.new_empty((q.shape[0], q.shape[1], K), dtype=torch.int64)

    @torch.library.register_fake("neusdf::knn_aggregate")
    def _(q, p, f, sigma, R, idx):
        B, Q, K = idx.shape
        return q.new_empty((B, Q, f.shape[2])), q.new_empty((B, Q, K)), q.new_empty((B, Q, K))

    @torch.library.register_fake("neusdf::knn_aggregate_backward")
    def _(gf, gw, gD, q, p, f, sigma, R, idx):
        return tuple(torch.empty_like(t) for t in (q, p, f, sigma, R))

    @torch.library.register_fake("neusdf::knn_aggregate_double_backward")
    def _(ggq, gf, gw, gD, q, p, f, sigma, R, idx):
        upstream = tuple(q.new_empty(0) if g is None else torch.empty_like(g) for g in (gf, gw, gD))
        return (*upstream, *(torch.empty_like(t) for t in (q, p, f, sigma, R)))
