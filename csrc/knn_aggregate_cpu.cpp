// CPU kernels of the anisotropic kNN aggregation (contracts in knn_aggregate.h).
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

// Geometry of pair number `pair` = (b * Q + i) * K + k; false when idx holds no valid point.
template <typename T>
struct Pair {
  int64_t b, i, j;  // batch, query, point
  T d[3], u[3], g[3], D, w;
};

template <typename T>
bool load_pair(const Views<T>& v, int64_t pair, Pair<T>& pr) {
  const ProblemSize& n = v.n;
  const int64_t bi = pair / n.K;
  pr.b = bi / n.Q;
  pr.i = bi % n.Q;
  pr.j = v.idx[pair];
  if (pr.j < 0 || pr.j >= n.P) return false;
  const int64_t pj = pr.b * n.P + pr.j;
  pr.D = pair_distance(v.q + 3 * bi, v.p + 3 * pj, v.s + 3 * pj, v.R + 9 * pj, pr.d, pr.u);
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

// Calls fn(pj, pair, geometry) for every valid pair, grouped by point pj = b * P + j: in
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

at::Tensor knn_search_cpu(const at::Tensor& q_in, const at::Tensor& p_in,
                          const at::Tensor& sigma_in, const at::Tensor& R_in, int64_t K) {
  const ProblemSize n = check_points(q_in, p_in, sigma_in, R_in, K);
  at::Tensor idx = at::empty({n.B, n.Q, K}, q_in.options().dtype(at::kLong));
  if (n.B * n.Q == 0) return idx;
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), s = sigma_in.contiguous(),
                   R = R_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_search_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, at::Tensor(), s, R, at::Tensor(), n);
    int64_t* out = idx.data_ptr<int64_t>();
    at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<T, int64_t>> cand(n.P);
      const auto before = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
        return comes_before(a.first, a.second, b.first, b.second);
      };
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t b = bi / n.Q;
        for (int64_t j = 0; j < n.P; ++j) {
          const int64_t pj = b * n.P + j;
          T d[3], u[3];
          cand[j] = {search_key(pair_distance(v.q + 3 * bi, v.p + 3 * pj, v.s + 3 * pj,
                                              v.R + 9 * pj, d, u)),
                     j};
        }
        std::nth_element(cand.begin(), cand.begin() + (K - 1), cand.end(), before);
        std::sort(cand.begin(), cand.begin() + K, before);
        for (int64_t k = 0; k < K; ++k) out[bi * K + k] = cand[k].second;
      }
    });
  });
  return idx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_aggregate_cpu(
    const at::Tensor& q_in, const at::Tensor& p_in, const at::Tensor& f_in,
    const at::Tensor& sigma_in, const at::Tensor& R_in, const at::Tensor& idx_in) {
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  at::Tensor f_out = at::zeros({n.B, n.Q, n.F}, q_in.options());
  at::Tensor w = at::empty({n.B, n.Q, n.K}, q_in.options());
  at::Tensor D = at::empty({n.B, n.Q, n.K}, q_in.options());
  if (n.B * n.Q == 0) return {f_out, w, D};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   s = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, f, s, R, idx, n);
    T* fo = f_out.data_ptr<T>();
    T* wo = w.data_ptr<T>();
    T* Do = D.data_ptr<T>();
    at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        T* out = fo + bi * n.F;
        for (int64_t k = 0; k < n.K; ++k) {
          const int64_t t = bi * n.K + k;
          Pair<T> pr;
          if (!load_pair(v, t, pr)) {  // a malformed idx poisons this query, never reads OOB
            wo[t] = Do[t] = std::numeric_limits<T>::quiet_NaN();
            std::fill(out, out + n.F, std::numeric_limits<T>::quiet_NaN());
            continue;
          }
          wo[t] = pr.w;
          Do[t] = pr.D;
          const T* fj = v.f + (pr.b * n.P + pr.j) * n.F;
          add_scaled(out, pr.w, fj, n.F);
        }
      }
    });
  });
  return {f_out, w, D};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_aggregate_backward_cpu(
    const std::optional<at::Tensor>& gf_in, const std::optional<at::Tensor>& gw_in,
    const std::optional<at::Tensor>& gD_in, const at::Tensor& q_in, const at::Tensor& p_in,
    const at::Tensor& f_in, const at::Tensor& sigma_in, const at::Tensor& R_in,
    const at::Tensor& idx_in) {
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  const at::Tensor &gf = up.gf, &gw = up.gw, &gD = up.gD;
  at::Tensor gq = at::zeros_like(q_in, at::MemoryFormat::Contiguous);
  at::Tensor gp = at::zeros_like(p_in, at::MemoryFormat::Contiguous);
  at::Tensor gfi = at::zeros_like(f_in, at::MemoryFormat::Contiguous);
  at::Tensor gs = at::zeros_like(sigma_in, at::MemoryFormat::Contiguous);
  at::Tensor gR = at::zeros_like(R_in, at::MemoryFormat::Contiguous);
  if (n.B * n.Q == 0) return {gq, gp, gfi, gs, gR};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   s = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_backward_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, f, s, R, idx, n);
    const T* gfp = data_or_null<T>(gf);  // absent upstreams count as zero
    const T* gwp = data_or_null<T>(gw);
    const T* gDp = data_or_null<T>(gD);
    // Per pair: Dbar = dL/dD through both w and D, and w, for the point pass.
    std::vector<T> dbar(n.B * n.Q * n.K), wpair(n.B * n.Q * n.K);
    T* gqp = gq.data_ptr<T>();
    at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const T* gfq = gfp ? gfp + bi * n.F : nullptr;
        for (int64_t k = 0; k < n.K; ++k) {
          const int64_t t = bi * n.K + k;
          Pair<T> pr;
          if (!load_pair(v, t, pr)) continue;
          const T* fj = v.f + (pr.b * n.P + pr.j) * n.F;
          const T gf_f = gfq ? dot(gfq, fj, n.F) : T(0);
          dbar[t] = (gDp ? gDp[t] : T(0)) - pr.w * (gf_f + (gwp ? gwp[t] : T(0)));
          wpair[t] = pr.w;
          for (int c = 0; c < 3; ++c) gqp[3 * bi + c] += dbar[t] * pr.g[c];
        }
      }
    });
    T* gpp = gp.data_ptr<T>();
    T* gfip = gfi.data_ptr<T>();
    T* gsp = gs.data_ptr<T>();
    T* gRp = gR.data_ptr<T>();
    for_each_pair_by_point(v, [&](int64_t pj, int64_t t, const Pair<T>& pr) {
      add_first_order_point_terms(dbar[t], v.s + 3 * pj, pr.d, pr.u, pr.g, gpp + 3 * pj,
                                  gsp + 3 * pj, gRp + 9 * pj);
      if (gfp) add_scaled(gfip + pj * n.F, wpair[t], gfp + (t / n.K) * n.F, n.F);
    });
  });
  return {gq, gp, gfi, gs, gR};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
knn_aggregate_double_backward_cpu(const at::Tensor& ggq_in,
                                  const std::optional<at::Tensor>& gf_in,
                                  const std::optional<at::Tensor>& gw_in,
                                  const std::optional<at::Tensor>& gD_in, const at::Tensor& q_in,
                                  const at::Tensor& p_in, const at::Tensor& f_in,
                                  const at::Tensor& sigma_in, const at::Tensor& R_in,
                                  const at::Tensor& idx_in) {
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  check_upstream(ggq_in, "ggq", {n.B, n.Q, 3}, q_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  const at::Tensor &gf = up.gf, &gw = up.gw, &gD = up.gD;
  const auto opts = q_in.options();
  // The gradient of an absent upstream is empty (its input is None).
  const auto upstream_grad = [&](const at::Tensor& g) {
    return g.defined() ? at::zeros_like(g) : at::empty({0}, opts);
  };
  at::Tensor g_gf = upstream_grad(gf);
  at::Tensor g_gw = upstream_grad(gw);
  at::Tensor g_gD = upstream_grad(gD);
  at::Tensor g_q = at::zeros({n.B, n.Q, 3}, opts);
  at::Tensor g_p = at::zeros({n.B, n.P, 3}, opts);
  at::Tensor g_f = at::zeros({n.B, n.P, n.F}, opts);
  at::Tensor g_s = at::zeros({n.B, n.P, 3}, opts);
  at::Tensor g_R = at::zeros({n.B, n.P, 3, 3}, opts);
  if (n.B * n.Q == 0) return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_s, g_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   s = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous(),
                   ggq = ggq_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_double_backward_cpu", [&] {
    using T = scalar_t;
    const Views<T> v = views<T>(q, p, f, s, R, idx, n);
    const T* ep = ggq.data_ptr<T>();
    const T* gfp = data_or_null<T>(gf);  // absent upstreams count as zero
    const T* gwp = data_or_null<T>(gw);
    const T* gDp = data_or_null<T>(gD);
    // Per pair, for the point pass: E = dL/dD through w, Dbar (weight of the H e terms),
    // ws = w * (e . g).
    const int64_t pairs = n.B * n.Q * n.K;
    std::vector<T> E(pairs), dbar(pairs), ws(pairs);
    T* g_gfp = gfp ? g_gf.data_ptr<T>() : nullptr;
    T* g_gwp = gwp ? g_gw.data_ptr<T>() : nullptr;
    T* g_gDp = gDp ? g_gD.data_ptr<T>() : nullptr;
    T* g_qp = g_q.data_ptr<T>();
    at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const T* gfq = gfp ? gfp + bi * n.F : nullptr;
        const T* e = ep + 3 * bi;
        for (int64_t k = 0; k < n.K; ++k) {
          const int64_t t = bi * n.K + k;
          Pair<T> pr;
          if (!load_pair(v, t, pr)) continue;
          const int64_t pj = pr.b * n.P + pr.j;
          const T* fj = v.f + pj * n.F;
          const T inner = (gfq ? dot(gfq, fj, n.F) : T(0)) + (gwp ? gwp[t] : T(0));
          const T es = e[0] * pr.g[0] + e[1] * pr.g[1] + e[2] * pr.g[2];
          dbar[t] = (gDp ? gDp[t] : T(0)) - pr.w * inner;
          E[t] = es * pr.w * inner;
          ws[t] = pr.w * es;
          if (g_gDp) g_gDp[t] = es;
          if (g_gwp) g_gwp[t] = -ws[t];
          if (g_gfp) add_scaled(g_gfp + bi * n.F, -ws[t], fj, n.F);
          T a[3], h[3];
          hessian_times(v.s + 3 * pj, v.R + 9 * pj, e, a, h);
          for (int c = 0; c < 3; ++c) g_qp[3 * bi + c] += E[t] * pr.g[c] + dbar[t] * h[c];
        }
      }
    });
    T* g_pp = g_p.data_ptr<T>();
    T* g_fp = g_f.data_ptr<T>();
    T* g_sp = g_s.data_ptr<T>();
    T* g_Rp = g_R.data_ptr<T>();
    for_each_pair_by_point(v, [&](int64_t pj, int64_t t, const Pair<T>& pr) {
      const int64_t bi = t / n.K;
      add_first_order_point_terms(E[t], v.s + 3 * pj, pr.d, pr.u, pr.g, g_pp + 3 * pj,
                                  g_sp + 3 * pj, g_Rp + 9 * pj);
      add_second_order_point_terms(dbar[t], ep + 3 * bi, v.s + 3 * pj, v.R + 9 * pj, pr.d, pr.u,
                                   g_pp + 3 * pj, g_sp + 3 * pj, g_Rp + 9 * pj);
      if (gfp) add_scaled(g_fp + pj * n.F, -ws[t], gfp + bi * n.F, n.F);
    });
  });
  return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_s, g_R};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CPU, m) {
  m.impl("knn_search", &neusdf::knn_search_cpu);
  m.impl("knn_aggregate", &neusdf::knn_aggregate_cpu);
  m.impl("knn_aggregate_backward", &neusdf::knn_aggregate_backward_cpu);
  m.impl("knn_aggregate_double_backward", &neusdf::knn_aggregate_double_backward_cpu);
}
