// CPU kernels of the anisotropic kNN aggregation, its backward and double backward (contracts
// in knn_aggregate.h; the search is in knn_search_cpu.cpp).
//
// Queries are processed in parallel with at::parallel_for. Gradients that belong to points
// (many queries share a point) are not scattered from the query loop, which would race;
// instead the (query, neighbour) pairs are grouped by point with a counting sort and a second
// parallel loop runs over points. Every sum is therefore taken in a fixed order: the CPU
// results are deterministic, which the float64 gradcheck relies on.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"

namespace neusdf {
namespace {

// Raw views of contiguous inputs.
template <typename T>
struct Views {
  const T* q;
  const T* p;
  const T* f;
  const T* s;
  const T* R;
  const int64_t* idx;
  ProblemSize n;
};

template <typename T>
Views<T> views(const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
               const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx,
               const ProblemSize& n) {
  return {q.data_ptr<T>(), p.data_ptr<T>(), f.defined() ? f.data_ptr<T>() : nullptr,
          s.data_ptr<T>(), R.data_ptr<T>(), idx.defined() ? idx.data_ptr<int64_t>() : nullptr,
          n};
}

// Geometry of pair t = bq * K + k (bq = b * Q + query); false when idx holds no valid point.
template <typename T>
struct Pair {
  int64_t b, j, pj;  // batch, point within the batch, flat point index b * P + j
  T d[3], u[3], g[3], D, w;
};

template <typename T>
bool load_pair(const Views<T>& v, int64_t t, Pair<T>& pr) {
  const ProblemSize& n = v.n;
  const int64_t bq = t / n.K;
  pr.b = bq / n.Q;
  pr.j = v.idx[t];
  if (pr.j < 0 || pr.j >= n.P) return false;
  const int64_t pj = pr.b * n.P + pr.j;
  pr.pj = pj;
  pr.D = pair_distance(v.q + 3 * bq, v.p + 3 * pj, v.s + 3 * pj, v.R + 9 * pj, pr.d, pr.u);
  pr.w = std::exp(-pr.D);
  scaled_transpose(v.s + 3 * pj, v.R + 9 * pj, pr.u, pr.g);
  return true;
}

// Pairs grouped by point: the pairs of point j of batch b are pair[start[b*P+j] .. start[b*P+j+1]),
// in increasing pair order. Pairs with an invalid index belong to no point.
struct PointPairs {
  std::vector<int64_t> start;
  std::vector<int64_t> pair;
};

PointPairs group_pairs_by_point(const int64_t* idx, const ProblemSize& n) {
  PointPairs g;
  g.start.assign(n.B * n.P + 1, 0);
  const int64_t pairs = n.B * n.Q * n.K;
  for (int64_t t = 0; t < pairs; ++t) {
    const int64_t j = idx[t];
    if (j >= 0 && j < n.P) ++g.start[t / (n.Q * n.K) * n.P + j + 1];
  }
  for (int64_t t = 0; t < n.B * n.P; ++t) g.start[t + 1] += g.start[t];
  g.pair.resize(g.start.back());
  std::vector<int64_t> cursor(g.start.begin(), g.start.end() - 1);
  for (int64_t t = 0; t < pairs; ++t) {
    const int64_t j = idx[t];
    if (j >= 0 && j < n.P) g.pair[cursor[t / (n.Q * n.K) * n.P + j]++] = t;
  }
  return g;
}

// Grain sizes for at::parallel_for: enough work per task to amortise scheduling.
constexpr int64_t kQueryGrain = 64;
constexpr int64_t kPointGrain = 64;

// Calls fn(pj, t, geometry) for every valid pair t, grouped by point pj = b * P + j: in
// parallel over points, each point's pairs in increasing pair order, so that the per-point
// sums fn makes are race-free and always taken in the same order.
template <typename T, typename Fn>
void for_each_pair_by_point(const Views<T>& v, const Fn& fn) {
  const PointPairs groups = group_pairs_by_point(v.idx, v.n);
  at::parallel_for(0, v.n.B * v.n.P, kPointGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pj = begin; pj < end; ++pj) {
      for (int64_t x = groups.start[pj]; x < groups.start[pj + 1]; ++x) {
        const int64_t t = groups.pair[x];
        Pair<T> pr;
        load_pair(v, t, pr);
        fn(pj, t, pr);
      }
    }
  });
}

// sum_c a[c] * b[c] over F channels.
template <typename T>
T dot(const T* a, const T* b, int64_t F) {
  T sum = 0;
  for (int64_t c = 0; c < F; ++c) sum += a[c] * b[c];
  return sum;
}

// out[c] += scale * x[c] over F channels.
template <typename T>
void add_scaled(T* out, T scale, const T* x, int64_t F) {
  for (int64_t c = 0; c < F; ++c) out[c] += scale * x[c];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_aggregate_cpu(
    const at::Tensor& q_in, const at::Tensor& p_in, const at::Tensor& f_in,
    const at::Tensor& sigma_in, const at::Tensor& R_in, const at::Tensor& idx_in,
    const std::optional<at::Tensor>& order) {
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  check_order(order, n, q_in);  // the visiting order changes nothing here: checked, unused
  at::Tensor f_out = at::zeros({n.B, n.Q, n.F}, q_in.options());
  at::Tensor w = at::empty({n.B, n.Q, n.K}, q_in.options());
  at::Tensor dists = at::empty({n.B, n.Q, n.K}, q_in.options());
  if (n.B * n.Q == 0) return {f_out, w, dists};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(),
                   idx = idx_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, f, sigma, R, idx, n);
    T* f_out_p = f_out.data_ptr<T>();
    T* w_p = w.data_ptr<T>();
    T* dists_p = dists.data_ptr<T>();
    at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bq = begin; bq < end; ++bq) {
        T* out = f_out_p + bq * n.F;
        for (int64_t k = 0; k < n.K; ++k) {
          const int64_t t = bq * n.K + k;
          Pair<T> pr;
          if (!load_pair(v, t, pr)) {  // a malformed idx poisons this query, never reads OOB
            w_p[t] = dists_p[t] = std::numeric_limits<T>::quiet_NaN();
            std::fill(out, out + n.F, std::numeric_limits<T>::quiet_NaN());
            continue;
          }
          w_p[t] = pr.w;
          dists_p[t] = pr.D;
          add_scaled(out, pr.w, v.f + pr.pj * n.F, n.F);
        }
      }
    });
  });
  return {f_out, w, dists};
}

// The upstream gradients as raw pointers; null when absent (their terms count as zero).
template <typename T>
struct UpstreamViews {
  const T* gf;
  const T* gw;
  const T* gD;

  explicit UpstreamViews(const Upstreams& up)
      : gf(data_or_null<T>(up.gf)), gw(data_or_null<T>(up.gw)), gD(data_or_null<T>(up.gD)) {}

  // dL/dw of pair t (gf . f_k + gw) and its dL/dD upstream gD.
  T inner(int64_t t, int64_t bq, const T* f_row, int64_t F) const {
    return (gf ? dot(gf + bq * F, f_row, F) : T(0)) + (gw ? gw[t] : T(0));
  }
  T gD_at(int64_t t) const { return gD ? gD[t] : T(0); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_aggregate_backward_cpu(
    const std::optional<at::Tensor>& gf_in, const std::optional<at::Tensor>& gw_in,
    const std::optional<at::Tensor>& gD_in, const at::Tensor& q_in, const at::Tensor& p_in,
    const at::Tensor& f_in, const at::Tensor& sigma_in, const at::Tensor& R_in,
    const at::Tensor& idx_in, const std::optional<at::Tensor>& order) {
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  check_order(order, n, q_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  at::Tensor grad_q = at::zeros_like(q_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_p = at::zeros_like(p_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_f = at::zeros_like(f_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_sigma = at::zeros_like(sigma_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_R = at::zeros_like(R_in, at::MemoryFormat::Contiguous);
  if (n.B * n.Q == 0) return {grad_q, grad_p, grad_f, grad_sigma, grad_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(),
                   idx = idx_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_backward_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, f, sigma, R, idx, n);
    const UpstreamViews<T> g(up);
    // Per pair: dbar = dL/dD through both w and D, and w, for the point pass.
    std::vector<T> dbar(n.B * n.Q * n.K), w_pair(n.B * n.Q * n.K);
    T* grad_q_p = grad_q.data_ptr<T>();
    at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bq = begin; bq < end; ++bq) {
        for (int64_t k = 0; k < n.K; ++k) {
          const int64_t t = bq * n.K + k;
          Pair<T> pr;
          if (!load_pair(v, t, pr)) continue;
          dbar[t] = backward_dbar(g.gD_at(t), pr.w, g.inner(t, bq, v.f + pr.pj * n.F, n.F));
          w_pair[t] = pr.w;
          for (int c = 0; c < 3; ++c) grad_q_p[3 * bq + c] += dbar[t] * pr.g[c];
        }
      }
    });
    T* grad_p_p = grad_p.data_ptr<T>();
    T* grad_f_p = grad_f.data_ptr<T>();
    T* grad_sigma_p = grad_sigma.data_ptr<T>();
    T* grad_R_p = grad_R.data_ptr<T>();
    for_each_pair_by_point(v, [&](int64_t pj, int64_t t, const Pair<T>& pr) {
      add_first_order_point_terms(dbar[t], v.s + 3 * pj, pr.d, pr.u, pr.g, grad_p_p + 3 * pj,
                                  grad_sigma_p + 3 * pj, grad_R_p + 9 * pj);
      if (g.gf) add_scaled(grad_f_p + pj * n.F, w_pair[t], g.gf + (t / n.K) * n.F, n.F);
    });
  });
  return {grad_q, grad_p, grad_f, grad_sigma, grad_R};
}

// Outputs of the double backward as raw pointers (null for the gradient of an absent upstream).
template <typename T>
struct DoubleBackwardOut {
  T *g_gf, *g_gw, *g_gD, *g_q, *g_p, *g_f, *g_sigma, *g_R;
};

// Query pass of the double backward, in parallel over queries: the per-pair scalars (kept in
// sc for the point pass) and everything indexed by the query (g_q, g_gf) or the pair (g_gw,
// g_gD).
template <typename T>
void double_backward_query_pass(const Views<T>& v, const UpstreamViews<T>& g, const T* ggq,
                                const DoubleBackwardOut<T>& out,
                                std::vector<DoubleBackwardScalars<T>>& sc) {
  const ProblemSize& n = v.n;
  at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const T* e = ggq + 3 * bq;
      for (int64_t k = 0; k < n.K; ++k) {
        const int64_t t = bq * n.K + k;
        Pair<T> pr;
        if (!load_pair(v, t, pr)) continue;
        const T* f_row = v.f + pr.pj * n.F;
        sc[t] = double_backward_scalars(e, pr.g, pr.w, g.inner(t, bq, f_row, n.F), g.gD_at(t));
        if (out.g_gD) out.g_gD[t] = sc[t].es;
        if (out.g_gw) out.g_gw[t] = -sc[t].ws;
        if (out.g_gf) add_scaled(out.g_gf + bq * n.F, -sc[t].ws, f_row, n.F);
        add_double_backward_query_terms(sc[t], e, v.s + 3 * pr.pj, v.R + 9 * pr.pj, pr.g,
                                        out.g_q + 3 * bq);
      }
    }
  });
}

// Point pass of the double backward, in parallel over points (race-free, fixed order).
template <typename T>
void double_backward_point_pass(const Views<T>& v, const UpstreamViews<T>& g, const T* ggq,
                                const DoubleBackwardOut<T>& out,
                                const std::vector<DoubleBackwardScalars<T>>& sc) {
  const int64_t F = v.n.F;
  for_each_pair_by_point(v, [&](int64_t pj, int64_t t, const Pair<T>& pr) {
    const int64_t bq = t / v.n.K;
    add_double_backward_point_terms(sc[t], ggq + 3 * bq, v.s + 3 * pj, v.R + 9 * pj, pr.d, pr.u,
                                    pr.g, out.g_p + 3 * pj, out.g_sigma + 3 * pj, out.g_R + 9 * pj);
    if (g.gf) add_scaled(out.g_f + pj * F, -sc[t].ws, g.gf + bq * F, F);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
knn_aggregate_double_backward_cpu(const at::Tensor& ggq_in,
                                  const std::optional<at::Tensor>& gf_in,
                                  const std::optional<at::Tensor>& gw_in,
                                  const std::optional<at::Tensor>& gD_in, const at::Tensor& q_in,
                                  const at::Tensor& p_in, const at::Tensor& f_in,
                                  const at::Tensor& sigma_in, const at::Tensor& R_in,
                                  const at::Tensor& idx_in,
                                  const std::optional<at::Tensor>& order) {
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  check_upstream(ggq_in, "ggq", {n.B, n.Q, 3}, q_in);
  check_order(order, n, q_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  const auto opts = q_in.options();
  // The gradient of an absent upstream is empty (its input is None).
  const auto upstream_grad = [&](const at::Tensor& g) {
    return g.defined() ? at::zeros_like(g) : at::empty({0}, opts);
  };
  at::Tensor g_gf = upstream_grad(up.gf);
  at::Tensor g_gw = upstream_grad(up.gw);
  at::Tensor g_gD = upstream_grad(up.gD);
  at::Tensor g_q = at::zeros({n.B, n.Q, 3}, opts);
  at::Tensor g_p = at::zeros({n.B, n.P, 3}, opts);
  at::Tensor g_f = at::zeros({n.B, n.P, n.F}, opts);
  at::Tensor g_sigma = at::zeros({n.B, n.P, 3}, opts);
  at::Tensor g_R = at::zeros({n.B, n.P, 3, 3}, opts);
  if (n.B * n.Q == 0) return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_sigma, g_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(),
                   idx = idx_in.contiguous(), ggq = ggq_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_double_backward_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, f, sigma, R, idx, n);
    const UpstreamViews<T> g(up);
    const auto ptr_if = [](const at::Tensor& upstream, at::Tensor& grad) {
      return upstream.defined() ? grad.data_ptr<T>() : nullptr;
    };
    const DoubleBackwardOut<T> out{ptr_if(up.gf, g_gf),   ptr_if(up.gw, g_gw),
                                   ptr_if(up.gD, g_gD),   g_q.data_ptr<T>(),
                                   g_p.data_ptr<T>(),     g_f.data_ptr<T>(),
                                   g_sigma.data_ptr<T>(), g_R.data_ptr<T>()};
    std::vector<DoubleBackwardScalars<T>> sc(n.B * n.Q * n.K);
    double_backward_query_pass(v, g, ggq.data_ptr<T>(), out, sc);
    double_backward_point_pass(v, g, ggq.data_ptr<T>(), out, sc);
  });
  return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_sigma, g_R};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CPU, m) {
  m.impl("knn_aggregate", &neusdf::knn_aggregate_cpu);
  m.impl("knn_aggregate_backward", &neusdf::knn_aggregate_backward_cpu);
  m.impl("knn_aggregate_double_backward", &neusdf::knn_aggregate_double_backward_cpu);
}
