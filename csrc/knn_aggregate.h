// The anisotropic kNN feature aggregation: operator contracts and shared input checks.
//
// Shapes (B batches of independent problems; all float tensors one dtype, float32 or float64,
// all on one device):
//   q     (B, Q, 3)     query points
//   p     (B, P, 3)     neural points
//   f     (B, P, F)     their features
//   sigma (B, P, 3)     per-axis precisions (inverse squared scales), expected > 0
//   R     (B, P, 3, 3)  per-point axes, one per row, not assumed orthonormal
//   idx   (B, Q, K)     int64 neighbour indices into P, sorted by distance
// For query q and point k: d = q - p_k, u = R_k d, D = sum_j sigma_kj u_j^2, w = exp(-D).
//
// Operators (namespace neusdf, registered in knn_aggregate.cpp, kernels per device in
// knn_aggregate_cpu.cpp and knn_aggregate_cuda.cu):
//   knn_search(q, p, sigma?, R?, K, method="auto") -> idx (B, Q, K) int64
//       The K points with the smallest D, ascending, ties to the lower index; NaN and +inf
//       distances sort last. 1 <= K <= P. method: "brute" (every point), "grid" (the exact
//       ring search of knn_grid.h's uniform grid; on CUDA for K <= 32), "tile" (the exact
//       Morton-tile search, knn_grid.h's "tiles"; on CUDA for K <= 32) or "auto"
//       (choose_search_method). Every method gives identical results. sigma and R both absent: the Euclidean metric,
//       the same result, bit for bit, as sigma = 1 and R = I (CUDA's brute force has a kernel
//       for it; the other paths run the general one on a materialised identity).
//   knn_search_ordered(q, p, sigma?, R?, K, method="auto") -> (idx, order)
//       knn_search's idx, and order (B * Q,) int64: a permutation of the flat queries bq in
//       which queries near each other in space come near each other, where the method sorted
//       the queries (the tile search's Morton order, the CUDA grid's cell order), else the
//       identity (brute force, and on the CPU). The aggregation operators take it as their
//       visiting order.
//   knn_aggregate(q, p, f, sigma, R, idx, order?) -> (f_out (B, Q, F), w (B, Q, K),
//       dists (B, Q, K)): f_out = sum_k w_k f_idx[k]; not normalised.
//       order (optional, (B * Q,) int64, a permutation of the flat queries, as
//       knn_search_ordered returns): the order in which the CUDA kernels visit the queries
//       (slot s of the launch takes query order[s]), which changes no result: queries whose
//       neighbours overlap then share a block, and their feature rows the block's caches (at
//       P = 1M the forward kernel 0.52x and each backward 0.60x the time, docs/op.md). The CPU
//       kernels check it and ignore it. A value outside [0, B * Q) leaves its slot idle; an
//       order that is not a permutation leaves the outputs of the queries it misses
//       unwritten (never an out-of-bounds access).
//   knn_aggregate_backward(gf?, gw?, gD?, q, p, f, sigma, R, idx, order?)
//       -> (grad_q, grad_p, grad_f, grad_sigma, grad_R): the vector-Jacobian product of
//       knn_aggregate for upstreams gf of f_out (B, Q, F), gw of w and gD of dists (B, Q, K);
//       an absent (None) upstream counts as zero and its terms are skipped.
//   knn_aggregate_double_backward(ggq, gf?, gw?, gD?, q, p, f, sigma, R, idx, order?)
//       -> (g_gf, g_gw, g_gD, g_q, g_p, g_f, g_sigma, g_R): the gradient of
//       sum(ggq * grad_q) with respect to every input of knn_aggregate_backward; ggq (B, Q, 3).
//       The gradient of an absent upstream is returned as an empty tensor of shape (0,).
//       Both backward operators take knn_aggregate's visiting order (same rules).
//
// Index names used by every kernel: bq = b * Q + query (flat query), pj = b * P + j (flat
// point), t = bq * K + k (flat (query, neighbour) pair).
#pragma once

#include <c10/util/string_view.h>
#include <torch/types.h>

#include <optional>
#include <utility>

namespace neusdf {

// Sizes shared by every operator, read off validated inputs.
struct ProblemSize {
  int64_t B, Q, P, F, K;
};

// Checks q, p, sigma, R (ranks, trailing sizes, batch and P agreement, float dtype, one device)
// and 1 <= K <= P; returns the sizes (F = 0, K as given). sigma and R may both be undefined
// (knn_search's Euclidean metric); one without the other is an error.
ProblemSize check_points(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                         const at::Tensor& R, int64_t K);

// knn_search's optional metric as tensors: both given, or both undefined (Euclidean).
std::pair<at::Tensor, at::Tensor> search_metric(const std::optional<at::Tensor>& sigma,
                                                const std::optional<at::Tensor>& R);

// The Euclidean metric spelled out for p (B, P, 3): sigma = 1 (B, P, 3) and R = I (B, P, 3, 3),
// contiguous, for the search paths that have no kernel of their own for it.
std::pair<at::Tensor, at::Tensor> euclidean_metric(const at::Tensor& p);

// The search method knn_search runs.
enum class SearchMethod { kBrute, kGrid, kTile };

// Largest K of the CUDA grid and tile searches (their per-query lists live in registers).
constexpr int64_t kGridMaxKCuda = 32;

// On CUDA "auto" takes the tile search from P = 8192, and already from kTileEarlyPoints when the
// metric is anisotropic and the call holds at least kTileEarlyQueries queries (B * Q), enough
// blocks to repay the tile search's build (H100, P = 4096, GPU time over three runs: 3-20%
// faster than brute force with 24576 queries, 8-53% slower with 4096; the Euclidean brute force
// is faster still there; docs/op.md).
constexpr int64_t kTileEarlyPoints = 4096;
constexpr int64_t kTileEarlyQueries = 16384;

// Parses knn_search's method ("auto", "brute", "grid" or "tile"; anything else is an error).
// "auto" takes brute force unless there are enough points for pruning to pay off (P >= 1024 on
// the CPU; on CUDA P >= 8192, or P >= kTileEarlyPoints as above) and K is small against P
// (16 K <= P); then the grid on the CPU and the tile search on CUDA, at every larger P (the CUDA
// grid, one thread a query, is 30-60x slower than the tile search where the points lie on a
// surface and some queries are far from it, as in training; docs/op.md). "grid" or "tile" with
// K > 32 on CUDA is an error. euclidean: the call has no sigma and R.
SearchMethod choose_search_method(c10::string_view method, const ProblemSize& n, bool cuda,
                                  bool euclidean);

// Checks everything knn_aggregate takes (idx: int64, (B, Q, K) with 1 <= K <= P); returns sizes.
ProblemSize check_aggregate(const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                            const at::Tensor& sigma, const at::Tensor& R, const at::Tensor& idx);

// Checks the aggregation operators' optional visiting order: absent, or (B * Q,) int64 on q's
// device; returns it contiguous, or an undefined tensor when absent. Its values are not read
// on the host (a device synchronisation on CUDA): the kernels skip a slot whose value is out
// of range.
at::Tensor check_order(const std::optional<at::Tensor>& order, const ProblemSize& n,
                       const at::Tensor& q);

// Checks that an upstream gradient has the given shape, q's dtype and q's device.
void check_upstream(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                    const at::Tensor& q);

// The optional upstream gradients of the backward operators, checked ((B, Q, F), (B, Q, K),
// (B, Q, K); q's dtype and device) and made contiguous; each is undefined when absent.
struct Upstreams {
  at::Tensor gf, gw, gD;
};
Upstreams check_upstreams(const std::optional<at::Tensor>& gf,
                          const std::optional<at::Tensor>& gw,
                          const std::optional<at::Tensor>& gD, const ProblemSize& n,
                          const at::Tensor& q);

// Data pointer of a tensor, or nullptr when it is undefined (an absent upstream).
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace neusdf
