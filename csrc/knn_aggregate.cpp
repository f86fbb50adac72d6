// Operator schemas of the anisotropic kNN aggregation and the input checks both devices share.
// Contracts: knn_aggregate.h. Fake (meta) kernels and autograd are registered in Python
// (neusdf/ops/knn.py) through torch.library.
#include "knn_aggregate.h"

#include <torch/library.h>

#include <string>
#include <utility>

namespace neusdf {
namespace {

void check_float_tensor(const at::Tensor& t, const char* name, int64_t rank,
                        const at::Tensor& like) {
  TORCH_CHECK(t.dim() == rank, "neusdf: ", name, " must have ", rank, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "neusdf: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "neusdf: ", name, " has dtype ",
              t.scalar_type(), " but q has ", like.scalar_type(), "; use one dtype for all");
  TORCH_CHECK(t.device() == like.device(), "neusdf: ", name, " is on ", t.device(),
              " but q is on ", like.device(), "; put all inputs on one device");
}

}  // namespace

ProblemSize check_points(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                         const at::Tensor& R, int64_t K) {
  check_float_tensor(q, "q", 3, q);
  check_float_tensor(p, "p", 3, q);
  const int64_t B = q.size(0), Q = q.size(1), P = p.size(1);
  TORCH_CHECK(q.size(2) == 3, "neusdf: q must be (B, Q, 3), got ", q.sizes());
  TORCH_CHECK(p.size(0) == B && p.size(2) == 3, "neusdf: p must be (B, P, 3) with B = ", B,
              ", got ", p.sizes());
  TORCH_CHECK(sigma.defined() == R.defined(),
              "neusdf: pass sigma and R together, or neither (the Euclidean metric)");
  if (sigma.defined()) {
    check_float_tensor(sigma, "sigma", 3, q);
    check_float_tensor(R, "R", 4, q);
    TORCH_CHECK(sigma.size(0) == B && sigma.size(1) == P && sigma.size(2) == 3,
                "neusdf: sigma must be (B, P, 3) = (", B, ", ", P, ", 3), got ", sigma.sizes());
    TORCH_CHECK(R.size(0) == B && R.size(1) == P && R.size(2) == 3 && R.size(3) == 3,
                "neusdf: R must be (B, P, 3, 3) = (", B, ", ", P, ", 3, 3), got ", R.sizes());
  }
  TORCH_CHECK(K >= 1 && K <= P, "neusdf: K must satisfy 1 <= K <= P = ", P, ", got K = ", K);
  return {B, Q, P, 0, K};
}

std::pair<at::Tensor, at::Tensor> search_metric(const std::optional<at::Tensor>& sigma,
                                                const std::optional<at::Tensor>& R) {
  const auto or_undefined = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? *t : at::Tensor();
  };
  return {or_undefined(sigma), or_undefined(R)};
}

std::pair<at::Tensor, at::Tensor> euclidean_metric(const at::Tensor& p) {
  const int64_t B = p.size(0), P = p.size(1);
  return {at::ones({B, P, 3}, p.options()),
          at::eye(3, p.options()).expand({B, P, 3, 3}).contiguous()};
}

ProblemSize check_aggregate(const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                            const at::Tensor& sigma, const at::Tensor& R, const at::Tensor& idx) {
  TORCH_CHECK(idx.dim() == 3, "neusdf: idx must be (B, Q, K), got shape ", idx.sizes());
  ProblemSize n = check_points(q, p, sigma, R, idx.size(2));
  check_float_tensor(f, "f", 3, q);
  TORCH_CHECK(f.size(0) == n.B && f.size(1) == n.P, "neusdf: f must be (B, P, F) with (B, P) = (",
              n.B, ", ", n.P, "), got ", f.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "neusdf: idx must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == q.device(), "neusdf: idx is on ", idx.device(), " but q is on ",
              q.device());
  TORCH_CHECK(idx.size(0) == n.B && idx.size(1) == n.Q, "neusdf: idx must be (B, Q, K) with (B, Q) = (",
              n.B, ", ", n.Q, "), got ", idx.sizes());
  n.F = f.size(2);
  return n;
}

SearchMethod choose_search_method(c10::string_view method, const ProblemSize& n, bool cuda,
                                  bool euclidean) {
  if (method == "brute") return SearchMethod::kBrute;
  if (method == "grid" || method == "tile") {
    TORCH_CHECK(!cuda || n.K <= kGridMaxKCuda, "neusdf: method=\"",
                std::string(method.data(), method.size()), "\" supports K <= ", kGridMaxKCuda,
                " on CUDA, got K = ", n.K, "; use \"auto\" or \"brute\"");
    return method == "grid" ? SearchMethod::kGrid : SearchMethod::kTile;
  }
  TORCH_CHECK(method == "auto", "neusdf: knn_search method must be \"auto\", \"brute\", "
              "\"grid\" or \"tile\", got \"", std::string(method.data(), method.size()), "\"");
  const bool tiles_pay_early = cuda && !euclidean && n.B * n.Q >= kTileEarlyQueries;
  const int64_t min_points = !cuda ? 1024 : tiles_pay_early ? kTileEarlyPoints : 8192;
  const bool prune = n.P >= min_points && 16 * n.K <= n.P && (!cuda || n.K <= kGridMaxKCuda);
  if (!prune) return SearchMethod::kBrute;
  return cuda ? SearchMethod::kTile : SearchMethod::kGrid;
}

at::Tensor check_order(const std::optional<at::Tensor>& order, const ProblemSize& n,
                       const at::Tensor& q) {
  if (!order.has_value() || !order->defined()) return at::Tensor();
  const at::Tensor& o = *order;
  TORCH_CHECK(o.scalar_type() == at::kLong, "neusdf: order must be int64, got ", o.scalar_type());
  TORCH_CHECK(o.dim() == 1 && o.size(0) == n.B * n.Q,
              "neusdf: order must have shape (B * Q,) = (", n.B * n.Q, ",), got ", o.sizes());
  TORCH_CHECK(o.device() == q.device(), "neusdf: order is on ", o.device(), " but q is on ",
              q.device());
  return o.contiguous();
}

void check_upstream(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                    const at::Tensor& q) {
  TORCH_CHECK(grad.sizes() == shape, "neusdf: ", name, " must have shape ", shape, ", got ",
              grad.sizes());
  check_float_tensor(grad, name, static_cast<int64_t>(shape.size()), q);
}

Upstreams check_upstreams(const std::optional<at::Tensor>& gf,
                          const std::optional<at::Tensor>& gw,
                          const std::optional<at::Tensor>& gD, const ProblemSize& n,
                          const at::Tensor& q) {
  const auto read = [&](const std::optional<at::Tensor>& g, const char* name,
                        at::IntArrayRef shape) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    check_upstream(*g, name, shape, q);
    return g->contiguous();
  };
  return {read(gf, "gf", {n.B, n.Q, n.F}), read(gw, "gw", {n.B, n.Q, n.K}),
          read(gD, "gD", {n.B, n.Q, n.K})};
}

}  // namespace neusdf

TORCH_LIBRARY(neusdf, m) {
  m.def(
      "knn_search(Tensor q, Tensor p, Tensor? sigma, Tensor? R, int K, str method=\"auto\")"
      " -> Tensor");
  m.def(
      "knn_search_ordered(Tensor q, Tensor p, Tensor? sigma, Tensor? R, int K,"
      " str method=\"auto\") -> (Tensor, Tensor)");
  m.def(
      "knn_aggregate(Tensor q, Tensor p, Tensor f, Tensor sigma, Tensor R, Tensor idx,"
      " Tensor? order=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "knn_aggregate_backward(Tensor? gf, Tensor? gw, Tensor? gD, Tensor q, Tensor p,"
      " Tensor f, Tensor sigma, Tensor R, Tensor idx, Tensor? order=None)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "knn_aggregate_double_backward(Tensor ggq, Tensor? gf, Tensor? gw, Tensor? gD,"
      " Tensor q, Tensor p, Tensor f, Tensor sigma, Tensor R, Tensor idx, Tensor? order=None)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
