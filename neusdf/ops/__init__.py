"""The anisotropic kNN feature aggregation op (compiled CPU/CUDA) and its reference.

    from neusdf.ops import knn_aggregate_aniso
    f_out, w, dists, idx = knn_aggregate_aniso(q, p, f, sigma, R, K)

See :func:`neusdf.ops.knn.knn_aggregate_aniso` for the contract.
"""

from neusdf.ops.knn import (
    SEARCH_METHODS,
    KnnAggregateResult,
    knn_aggregate_aniso,
    knn_search_aniso,
)
from neusdf.ops.reference import knn_aggregate_aniso_reference, knn_search_aniso_reference

__all__ = [
    "SEARCH_METHODS",
    "KnnAggregateResult",
    "knn_aggregate_aniso",
    "knn_search_aniso",
    "knn_aggregate_aniso_reference",
    "knn_search_aniso_reference",
]
