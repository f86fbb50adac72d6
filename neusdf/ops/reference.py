"""Pure-PyTorch reference of the anisotropic kNN aggregation (the test oracle).

It builds the full anisotropic distance matrix (in chunks of queries), selects the K smallest
with ``topk``, gathers the neighbours and applies the formula of ``docs/op.md`` with plain
autograd-tracked tensor ops, so it is differentiable to any order. It is the "plain PyTorch"
row of every benchmark; its memory grows as B * chunk * P.
"""

from __future__ import annotations

import torch

from neusdf.ops.knn import KnnAggregateResult

__all__ = [
    "knn_aggregate_aniso_reference",
    "knn_search_aniso_reference",
    "anisotropic_dists",
    "euclidean_metric",
    "gather_points",
]


def anisotropic_dists(
    q: torch.Tensor, p: torch.Tensor, sigma: torch.Tensor, R: torch.Tensor
) -> torch.Tensor:
    """Anisotropic squared distances between every query and every point.

    Args:
        q: (B, Q, 3) queries. p: (B, P, 3) points. sigma: (B, P, 3) precisions.
        R: (B, P, 3, 3) per-point axes (rows), not assumed orthonormal.

    Returns:
        (B, Q, P) tensor D[b, i, k] = sum_j sigma[b,k,j] * (R[b,k] @ (q[b,i] - p[b,k]))_j ** 2.
    """
    d = q[:, :, None, :] - p[:, None, :, :]  # (B, Q, P, 3)
    u = torch.einsum("bpij,bqpj->bqpi", R, d)
    return (sigma[:, None] * u * u).sum(-1)


def gather_points(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gathers per-point rows for each (query, neighbour).

    Args:
        t: (B, P, *S) per-point tensor. idx: (B, Q, K) int64 indices into P.

    Returns:
        (B, Q, K, *S) tensor with out[b, i, k] = t[b, idx[b, i, k]].
    """
    B, Q, K = idx.shape
    flat = t.reshape(B, t.shape[1], -1)
    out = torch.gather(flat, 1, idx.reshape(B, Q * K, 1).expand(-1, -1, flat.shape[-1]))
    return out.reshape(B, Q, K, *t.shape[2:])


def euclidean_metric(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euclidean metric spelled out for points p (B, P, 3): sigma = 1 (B, P, 3) and R = I
    (B, P, 3, 3, expanded), p's dtype and device. The search with sigma = R = None gives the
    neighbours of these, bit for bit."""
    B, P = p.shape[:2]
    return p.new_ones(B, P, 3), torch.eye(3, dtype=p.dtype, device=p.device).expand(B, P, 3, 3)


def knn_search_aniso_reference(
    q: torch.Tensor,
    p: torch.Tensor,
    sigma: torch.Tensor | None,
    R: torch.Tensor | None,
    K: int,
    *,
    chunk: int = 4096,
) -> torch.Tensor:
    """Reference of :func:`neusdf.ops.knn_search_aniso`: idx (B, Q, K) int64, ascending.

    Shapes as in :func:`knn_aggregate_aniso_reference`; sigma and R both None: the Euclidean
    metric (sigma = 1, R = I). Memory grows as B * chunk * P. Uses
    ``topk`` as a plain-PyTorch user would; the K found are then ordered by (distance,
    index). Which of several exactly equal distances ``topk`` keeps at the K-th place is
    unspecified, so tie-breaking is tested on the compiled op directly.
    """
    if sigma is None and R is None:
        sigma, R = euclidean_metric(p)
    with torch.no_grad():
        parts = []
        for start in range(0, q.shape[1], chunk):
            D = anisotropic_dists(q[:, start : start + chunk], p, sigma, R)
            cand_d, cand_i = torch.topk(D, K, dim=-1, largest=False)
            by_index = torch.sort(cand_i, dim=-1)
            cand_d = torch.gather(cand_d, -1, by_index.indices)
            order = torch.sort(cand_d, dim=-1, stable=True).indices
            parts.append(torch.gather(by_index.values, -1, order))
        return torch.cat(parts, dim=1)


def knn_aggregate_aniso_reference(
    q: torch.Tensor,
    p: torch.Tensor,
    f: torch.Tensor,
    sigma: torch.Tensor,
    R: torch.Tensor,
    K: int,
    idx: torch.Tensor | None = None,
    *,
    chunk: int = 4096,
) -> KnnAggregateResult:
    """Reference of :func:`neusdf.ops.knn_aggregate_aniso` (same signature and outputs).

    Args:
        q: (B, Q, 3) queries. p: (B, P, 3) points. f: (B, P, F) features.
        sigma: (B, P, 3) per-axis precisions. R: (B, P, 3, 3) per-point axes (rows).
        K: neighbours per query, 1 <= K <= P.
        idx: optional (B, Q, K) int64 neighbours to reuse instead of searching.
        chunk: queries per distance-matrix chunk (bounds memory at B * chunk * P).

    Returns:
        A :class:`~neusdf.ops.knn.KnnAggregateResult`: f_out (B, Q, F), w (B, Q, K),
        dists (B, Q, K), idx (B, Q, K) int64.
    """
    if idx is None:
        idx = knn_search_aniso_reference(q, p, sigma, R, K, chunk=chunk)
    pk = gather_points(p, idx)  # (B, Q, K, 3)
    sk = gather_points(sigma, idx)
    Rk = gather_points(R, idx)  # (B, Q, K, 3, 3)
    fk = gather_points(f, idx)  # (B, Q, K, F)
    d = q[:, :, None, :] - pk
    u = torch.einsum("bqkij,bqkj->bqki", Rk, d)
    dists = (sk * u * u).sum(-1)
    w = torch.exp(-dists)
    f_out = (w[..., None] * fk).sum(2)
    return KnnAggregateResult(f_out, w, dists, idx)
