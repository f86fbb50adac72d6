// CUDA kernels of the anisotropic kNN aggregation, its backward and double backward
// (contracts in knn_aggregate.h; the search is in knn_search_cuda.cu).
//
// A warp holds 32 pairs (query, neighbour), one a lane, for the per-pair geometry, then reads
// and scatters the pairs' feature rows a group of lanes to a row (WarpLayout), so every access
// to a feature row is coalesced. Gradients of points (shared by many queries) are scattered
// with atomics; their order varies, so the CUDA gradients are deterministic only up to
// rounding.
//
// Names follow knn_aggregate.h: bq = b * Q + query (flat query index), pj = b * P + j (flat
// point index), t = bq * K + k (flat pair index); upstreams gf, gw, gD.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"
#include "knn_cuda_helpers.cuh"

namespace neusdf {
namespace {

// Warps per block of the aggregation kernels: 4 rather than 8 (the same warps an SM; a block's
// registers are freed when its last warp ends, so smaller blocks waste less of an SM while the
// slowest warps finish): the double backward in float 0.97-0.99x the time, the rest about the
// same (H200, docs/op.md).
constexpr int kWarpsPerBlock = 4;

// Warps an SM must have room for (the register budget of __launch_bounds__). For the float64
// kernels this is what matters: left to itself the compiler took 87 registers for the backward
// and 134 for the double backward (16 and 8 warps an SM); under budgets of 80 and 128 (24 and
// 16 warps) they took 0.90x and 0.60x the time (H200, docs/op.md), with at most 8 bytes
// spilled. The float budgets (32 and 16 warps) keep the occupancy the compiler's own choice
// gives (64 and 96-112 registers).
template <typename T>
constexpr int backward_min_warps() {
  return sizeof(T) == 8 ? 24 : 32;
}
template <typename T>
constexpr int double_backward_min_warps() {
  return 16;
}

// How the kernels lay a warp over pairs and feature rows (chosen on the host, warp_layout).
//
// Pairs: with K <= 32 the warp holds 32 / k_slots queries, k_slots = K rounded up to a power of
// two, lane l taking neighbour l % k_slots of query l / k_slots (K = 16: two queries a warp,
// K = 8: four, no lane idle while the pairs' geometry and point gradients are computed); with
// K > 32 one query, in rounds of 32 neighbours. Feature rows: a lane takes V channels at a
// time (one 16-byte load or atomic where V > 1) and a row row_lanes lanes (ceil(F / V) rounded
// up to a power of two, at most 32), so one instruction reaches 32 / row_lanes whole rows.
// Group g of row_lanes lanes works through the pairs of its own lanes g * row_lanes, ...,
// (g + 1) * row_lanes - 1: a dot product with a row is then summed within the group and ends
// on the pair's lane, and the group's pairs belong to one query (or a few in turn), so a
// query's weighted sum of rows needs no more than a shuffle between its groups. Measured
// against one query a warp with the channels across the lanes: docs/op.md.
struct WarpLayout {
  int k_slots;    // pair lanes per query (a power of two <= 32)
  int k_shift;    // log2(k_slots)
  int row_lanes;  // lanes per feature row (a power of two <= 32)
  int V;          // channels a lane loads at a time (1, or 16 bytes of them)
};

// The queries a lane's warp holds and the lane's own (WarpLayout), the same in all three
// kernels: warp w holds query slots w * 32 / k_slots, ..., lane l the (l / k_slots)-th of them,
// and slot s is query order[s] (the visiting order, knn_aggregate.h), or s without an order.
struct LaneQuery {
  int64_t bq0;     // the warp's first query slot
  int64_t BQ;      // B * Q
  int64_t bq;      // this lane's query (flat index b * Q + query)
  int64_t b;       // its batch (0 where the lane has no query)
  const int64_t* order;  // the visiting order, or null
  int lane;        // lane in the warp
  int slot;        // neighbour slot in the query's round: lane % k_slots
  bool has_query;  // the lane's slot is < BQ (the last warp may hold fewer) and its query valid

  // The query of the lane src's slot, or -1 where there is none (past BQ, or an order value
  // outside [0, BQ)).
  __device__ __forceinline__ int64_t query_of_lane(int src, int k_shift) const {
    const int64_t s = bq0 + (src >> k_shift);
    if (s >= BQ) return -1;
    const int64_t x = order != nullptr ? order[s] : s;
    return x >= 0 && x < BQ ? x : -1;
  }

  // Pair t = bq * K + k0 + slot of round k0 (neighbours k0, ..., k0 + k_slots - 1), or -1
  // where the lane holds none (no query, or past K).
  __device__ __forceinline__ int64_t pair(int64_t k0, int64_t K) const {
    const int64_t k = k0 + slot;
    return has_query && k < K ? bq * K + k : -1;
  }
};

__device__ __forceinline__ LaneQuery lane_query(const ProblemSize& n, const WarpLayout& layout,
                                                const int64_t* __restrict__ order) {
  LaneQuery lq;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  lq.lane = threadIdx.x % kWarp;
  lq.slot = lq.lane & (layout.k_slots - 1);
  lq.bq0 = warp * (kWarp / layout.k_slots);
  lq.BQ = n.B * n.Q;
  lq.order = order;
  lq.bq = lq.query_of_lane(lq.lane, layout.k_shift);
  lq.has_query = lq.bq >= 0;
  lq.b = lq.has_query ? lq.bq / n.Q : 0;
  return lq;
}

// The lane's query position (zeros where it has none).
template <typename T>
__device__ __forceinline__ void load_query(const T* __restrict__ q, const LaneQuery& lq,
                                           T (&qv)[3]) {
#pragma unroll
  for (int c = 0; c < 3; ++c) qv[c] = lq.has_query ? q[3 * lq.bq + c] : T(0);
}

// The geometry of the pair a lane holds. ok is false for lanes past K and for invalid indices.
template <typename T>
struct LanePair {
  bool ok;
  int64_t j;  // point index within the batch, -1 when not ok
  T d[3], u[3], g[3], s[3], R[9], D, w;
};

// Loads pair t (when in_range) of query qv in batch b: reads idx[t] and the point's record,
// computes d, u, D, w and g = dD/dq.
template <typename T>
__device__ __forceinline__ void load_lane_pair(const T* __restrict__ p, const T* __restrict__ sigma,
                                               const T* __restrict__ R,
                                               const int64_t* __restrict__ idx, const T qv[3],
                                               int64_t b, int64_t t, bool in_range, int64_t P,
                                               LanePair<T>& pr) {
  pr.ok = false;
  pr.j = -1;
  pr.w = 0;
  pr.D = 0;
  if (!in_range) return;
  const int64_t j = idx[t];
  if (j < 0 || j >= P) return;
  pr.ok = true;
  pr.j = j;
  const int64_t pj = b * P + j;
  T pv[3];
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    pv[c] = p[3 * pj + c];
    pr.s[c] = sigma[3 * pj + c];
  }
#pragma unroll
  for (int c = 0; c < 9; ++c) pr.R[c] = R[9 * pj + c];
  pr.D = pair_distance(qv, pv, pr.s, pr.R, pr.d, pr.u);
  pr.w = exp(-pr.D);
  scaled_transpose(pr.s, pr.R, pr.u, pr.g);
}

// Adds one pair's point-gradient terms to point pj's rows, atomically.
template <typename T>
__device__ __forceinline__ void atomic_add_point_terms(int64_t pj, const T gp[3], const T gs[3],
                                                       const T gR[9], T* __restrict__ grad_p,
                                                       T* __restrict__ grad_sigma,
                                                       T* __restrict__ grad_R) {
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    atomicAdd(grad_p + 3 * pj + c, gp[c]);
    atomicAdd(grad_sigma + 3 * pj + c, gs[c]);
  }
#pragma unroll
  for (int c = 0; c < 9; ++c) atomicAdd(grad_R + 9 * pj + c, gR[c]);
}

// Loads V channels at src (16-byte aligned where V > 1).
template <typename T, int V>
__device__ __forceinline__ void load_channels(const T* __restrict__ src, T (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = __ldg(src);
  } else if constexpr (V == 4) {
    static_assert(std::is_same_v<T, float>, "V = 4 is the float layout");
    const float4 x = __ldg(reinterpret_cast<const float4*>(src));
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
    static_assert(V == 2 && std::is_same_v<T, double>, "V = 2 is the double layout");
    const double2 x = __ldg(reinterpret_cast<const double2*>(src));
    v[0] = x.x, v[1] = x.y;
  }
}

// Stores V channels at dst (16-byte aligned where V > 1).
template <typename T, int V>
__device__ __forceinline__ void store_channels(T* __restrict__ dst, const T (&v)[V]) {
  if constexpr (V == 1) {
    dst[0] = v[0];
  } else if constexpr (V == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<double2*>(dst) = make_double2(v[0], v[1]);
  }
}

// Writes V summed channels to dst, or adds them to what it holds (a later round of K > 32
// neighbours). dst: a row of the fresh f_out, 16-byte aligned where V > 1 (V divides F).
template <typename T, int V>
__device__ __forceinline__ void add_channels(T* __restrict__ dst, const T (&acc)[V], bool add) {
  T sum[V];
#pragma unroll
  for (int e = 0; e < V; ++e) sum[e] = acc[e];
  if (add) {  // plain loads: this kernel wrote dst, so not through the read-only cache
#pragma unroll
    for (int e = 0; e < V; ++e) sum[e] += dst[e];
  }
  store_channels<T, V>(dst, sum);
}

// The gather of the forward and double backward over the pairs a warp holds (WarpLayout):
// out[query] = sum over the query's pairs of coef * f[row] (added to out's row when add).
// row: the pair's feature row offset in f, -1 for an invalid index (the query's sums become
// NaN), -2 for no pair (skipped). Group g of row_lanes lanes adds the pairs held by the same
// lanes g * row_lanes, ..., (g + 1) * row_lanes - 1: all neighbours of row_lanes / k_slots
// queries one after the other, or a share of one query's (the shares then summed by
// shuffles). Whole warp.
template <typename T, int V>
__device__ __forceinline__ void pair_weighted_rows(const T* __restrict__ f, int64_t row, T coef,
                                                   const WarpLayout& layout,
                                                   const LaneQuery& lq, int64_t F, bool add,
                                                   T* __restrict__ out) {
  const T nan = NAN;
  const int lane = lq.lane, group = lane / layout.row_lanes;
  const bool shared_query = layout.row_lanes <= layout.k_slots;
  const int last_pair = layout.k_slots - 1;  // lane & last_pair: the pair's neighbour slot
  // Chunks of row_lanes * V channels, the same trip counts on every lane: the shuffles
  // inside need the whole warp.
  for (int64_t c0 = 0; c0 * V < F; c0 += layout.row_lanes) {
    const int64_t c = (c0 + (lane & (layout.row_lanes - 1))) * V;  // this lane's channels
    const bool has_c = c < F;  // V divides F where V > 1
    T acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0;
    // kBatch pairs at a time: their shuffles, then their loads (predicated, so that all are in
    // flight together), then the sums; a loop of one pair each left one load in flight.
    constexpr int kBatch = 4;
    for (int i0 = 0; i0 < layout.row_lanes; i0 += kBatch) {
      int64_t rows[kBatch];
      T coefs[kBatch], v[kBatch][V];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int src = (group * layout.row_lanes + i0 + u) & (kWarp - 1);
        rows[u] = __shfl_sync(kFullMask, row, src);
        coefs[u] = __shfl_sync(kFullMask, coef, src);
        if (i0 + u >= layout.row_lanes) rows[u] = -2;  // row_lanes < kBatch: no such pair
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (has_c && rows[u] >= 0) load_channels<T, V>(f + rows[u] + c, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (has_c && rows[u] >= 0) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += coefs[u] * v[u][e];
        } else if (has_c && rows[u] == -1) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = nan;
        }
        const int src = group * layout.row_lanes + i0 + u;  // the pair's lane
        if (!shared_query && (src & last_pair) == last_pair) {  // the query's last pair
          const int64_t bqs = lq.query_of_lane(src, layout.k_shift);
          if (has_c && bqs >= 0) add_channels<T, V>(out + bqs * F + c, acc, add);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = 0;
        }
      }
    }
    if (shared_query) {
      for (int o = layout.row_lanes; o < layout.k_slots; o <<= 1) {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += __shfl_xor_sync(kFullMask, acc[e], o);
      }
      if (lq.slot < layout.row_lanes && has_c && lq.has_query)
        add_channels<T, V>(out + lq.bq * F + c, acc, add);
    }
  }
}

template <typename T, int V>
__global__ void knn_aggregate_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                     const T* __restrict__ f, const T* __restrict__ sigma,
                                     const T* __restrict__ R, const int64_t* __restrict__ idx,
                                     const int64_t* __restrict__ order, ProblemSize n,
                                     WarpLayout layout, T* __restrict__ f_out,
                                     T* __restrict__ w, T* __restrict__ dists) {
  const LaneQuery lq = lane_query(n, layout, order);
  if (lq.bq0 >= lq.BQ) return;  // whole warps leave together
  T qv[3];
  load_query(q, lq, qv);
  const T nan = NAN;
  for (int64_t k0 = 0; k0 < n.K; k0 += kWarp) {  // one round unless K > 32
    const int64_t t = lq.pair(k0, n.K);
    LanePair<T> pr;
    load_lane_pair(p, sigma, R, idx, qv, lq.b, t, t >= 0, n.P, pr);
    if (t >= 0) {
      w[t] = pr.ok ? pr.w : nan;
      dists[t] = pr.ok ? pr.D : nan;
    }
    // The gather needs of this lane's pair the offset of its feature row in f, or -1 for an
    // invalid index (NaN sums, as the pair's w and dists), -2 for no pair (skipped).
    const int64_t row = pr.ok ? (lq.b * n.P + pr.j) * n.F : (t >= 0 ? -1 : -2);
    pair_weighted_rows<T, V>(f, row, pr.w, layout, lq, n.F, k0 > 0, f_out);
  }
}

// Adds V channels to dst atomically (16-byte aligned where V > 1): one vector atomic for
// float V = 4 on sm_90, else one per channel.
template <typename T, int V>
__device__ __forceinline__ void atomic_add_channels(T* __restrict__ dst, const T (&v)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (V == 4) {
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
    return;
  }
#endif
#pragma unroll
  for (int e = 0; e < V; ++e) atomicAdd(dst + e, v[e]);
}

// The feature pass of the backward and double backward over the pairs a warp holds
// (WarpLayout): for each pair with a feature row (row >= 0, its offset in f; negative for
// none) it adds scale * gf[query] to that row of grad_f atomically, and returns on the pair's
// own lane gf[query] . f_row (0 for none).
// Group g of row_lanes lanes takes the pairs of its own lanes one after the other, so each
// dot is summed within the group and lands where it is needed. Whole warp.
template <typename T, int V>
__device__ __forceinline__ T pair_dots_and_scatter(const T* __restrict__ gf,
                                                   const T* __restrict__ f,
                                                   T* __restrict__ grad_f, int64_t row, T scale,
                                                   const WarpLayout& layout,
                                                   const LaneQuery& lq, int64_t F) {
  const int lane = lq.lane, group = lane / layout.row_lanes;
  const int first = (lane & (layout.row_lanes - 1)) * V;
  T dot = 0;
  for (int i = 0; i < layout.row_lanes; ++i) {
    const int src = group * layout.row_lanes + i;  // the pair's lane
    const int64_t row_k = __shfl_sync(kFullMask, row, src);
    const T scale_k = __shfl_sync(kFullMask, scale, src);
    T part = 0;
    if (row_k >= 0) {
      const T* gfq = gf + lq.query_of_lane(src, layout.k_shift) * F;  // the pair's query's upstream
      for (int64_t c = first; c < F; c += layout.row_lanes * V) {
        T g[V], v[V], add[V];
        load_channels<T, V>(gfq + c, g);
        load_channels<T, V>(f + row_k + c, v);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          part += g[e] * v[e];
          add[e] = scale_k * g[e];
        }
        atomic_add_channels<T, V>(grad_f + row_k + c, add);
      }
    }
    for (int o = 1; o < layout.row_lanes; o <<= 1) part += __shfl_xor_sync(kFullMask, part, o);
    if (lane == src) dot = part;
  }
  return dot;
}

// Sums the query gradient gq over the lanes of the query's pairs and writes it to out (3
// values) from the query's first lane. Whole warp.
template <typename T>
__device__ __forceinline__ void add_query_gradient(T (&gq)[3], const WarpLayout& layout,
                                                   const LaneQuery& lq, T* __restrict__ out) {
  for (int o = 1; o < layout.k_slots; o <<= 1) {
#pragma unroll
    for (int c = 0; c < 3; ++c) gq[c] += __shfl_xor_sync(kFullMask, gq[c], o);
  }
  if (lq.slot == 0 && lq.has_query) {
#pragma unroll
    for (int c = 0; c < 3; ++c) out[c] = gq[c];
  }
}

// The backward: pairs laid over the warp as in the forward (several queries a warp for K < 32).
template <typename T, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp,
                                  backward_min_warps<T>() / kWarpsPerBlock)
    knn_aggregate_backward_kernel(
    const T* __restrict__ gf, const T* __restrict__ gw, const T* __restrict__ gD,
    const T* __restrict__ q, const T* __restrict__ p, const T* __restrict__ f,
    const T* __restrict__ sigma, const T* __restrict__ R, const int64_t* __restrict__ idx,
    const int64_t* __restrict__ order, ProblemSize n, WarpLayout layout,
    T* __restrict__ grad_q, T* __restrict__ grad_p, T* __restrict__ grad_f,
    T* __restrict__ grad_sigma, T* __restrict__ grad_R) {
  const LaneQuery lq = lane_query(n, layout, order);
  if (lq.bq0 >= lq.BQ) return;  // whole warps leave together
  T qv[3];
  load_query(q, lq, qv);
  T gq[3] = {0, 0, 0};
  for (int64_t k0 = 0; k0 < n.K; k0 += kWarp) {  // one round unless K > 32
    const int64_t t = lq.pair(k0, n.K);
    LanePair<T> pr;
    load_lane_pair(p, sigma, R, idx, qv, lq.b, t, t >= 0, n.P, pr);
    const int64_t pj = lq.b * n.P + pr.j;  // the pair's flat point index (where pr.ok)
    // gf . f_k on the pair's lane; grad_f[k] += w_k gf. Absent upstreams (null) count as
    // zero; the null tests are uniform across the warp.
    const T dot = gf ? pair_dots_and_scatter<T, V>(gf, f, grad_f,
                                                   pr.ok ? pj * n.F : -1, pr.w,
                                                   layout, lq, n.F)
                     : T(0);
    if (pr.ok) {
      const T dbar = backward_dbar(gD ? gD[t] : T(0), pr.w, dot + (gw ? gw[t] : T(0)));
#pragma unroll
      for (int c = 0; c < 3; ++c) gq[c] += dbar * pr.g[c];
      T gp[3] = {0, 0, 0}, gs[3] = {0, 0, 0}, gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      add_first_order_point_terms(dbar, pr.s, pr.d, pr.u, pr.g, gp, gs, gR);
      atomic_add_point_terms(pj, gp, gs, gR, grad_p, grad_sigma, grad_R);
    }
  }
  add_query_gradient(gq, layout, lq, grad_q + 3 * lq.bq);
}

// The double backward: pairs laid over the warp as in the forward.
template <typename T, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp,
                                  double_backward_min_warps<T>() / kWarpsPerBlock)
    knn_aggregate_double_backward_kernel(
    const T* __restrict__ ggq, const T* __restrict__ gf, const T* __restrict__ gw,
    const T* __restrict__ gD, const T* __restrict__ q, const T* __restrict__ p,
    const T* __restrict__ f, const T* __restrict__ sigma, const T* __restrict__ R,
    const int64_t* __restrict__ idx, const int64_t* __restrict__ order, ProblemSize n,
    WarpLayout layout, T* __restrict__ g_gf, T* __restrict__ g_gw, T* __restrict__ g_gD,
    T* __restrict__ g_q, T* __restrict__ g_p, T* __restrict__ g_f, T* __restrict__ g_sigma,
    T* __restrict__ g_R) {
  const LaneQuery lq = lane_query(n, layout, order);
  if (lq.bq0 >= lq.BQ) return;  // whole warps leave together
  T qv[3], e[3];
  load_query(q, lq, qv);
  load_query(ggq, lq, e);  // the upstream of the query gradient, laid out as q
  T gq[3] = {0, 0, 0};
  for (int64_t k0 = 0; k0 < n.K; k0 += kWarp) {  // one round unless K > 32
    const int64_t t = lq.pair(k0, n.K);
    LanePair<T> pr;
    load_lane_pair(p, sigma, R, idx, qv, lq.b, t, t >= 0, n.P, pr);
    const int64_t pj = lq.b * n.P + pr.j;  // the pair's flat point index (where pr.ok)
    const T es = pr.ok ? e[0] * pr.g[0] + e[1] * pr.g[1] + e[2] * pr.g[2] : T(0);
    const T ws = pr.w * es;  // w_k (e . g_k)
    // Absent upstreams (null) count as zero and have no gradient to write; the null tests
    // are uniform across the warp.
    T dot = 0;
    if (gf) {
      const int64_t row = pr.ok ? pj * n.F : -2;  // -2: no row, skipped
      // gf . f_k on the pair's lane; g_f[k] -= ws_k gf; g_gf[query] -= sum_k ws_k f_k.
      dot = pair_dots_and_scatter<T, V>(gf, f, g_f, row, -ws, layout, lq, n.F);
      pair_weighted_rows<T, V>(f, row, -ws, layout, lq, n.F, k0 > 0, g_gf);
    }
    if (pr.ok) {
      const DoubleBackwardScalars<T> sc =
          double_backward_scalars(e, pr.g, pr.w, dot + (gw ? gw[t] : T(0)), gD ? gD[t] : T(0));
      if (gD) g_gD[t] = sc.es;
      if (gw) g_gw[t] = -sc.ws;
      add_double_backward_query_terms(sc, e, pr.s, pr.R, pr.g, gq);
      T gp[3] = {0, 0, 0}, gs[3] = {0, 0, 0}, gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      add_double_backward_point_terms(sc, e, pr.s, pr.R, pr.d, pr.u, pr.g, gp, gs, gR);
      atomic_add_point_terms(pj, gp, gs, gR, g_p, g_sigma, g_R);
    }
  }
  add_query_gradient(gq, layout, lq, g_q + 3 * lq.bq);
}

// Zeroes several buffers in one launch (the outputs that are accumulated with atomics): one
// launch instead of one fill per tensor keeps the host's per-call work down.
struct ZeroList {
  static constexpr int kMax = 8;
  uint32_t* ptr[kMax];
  int64_t words[kMax];
  int count;
};

__global__ void zero_buffers_kernel(ZeroList list) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int b = 0; b < list.count; ++b) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         i < list.words[b]; i += stride)
      list.ptr[b][i] = 0u;
  }
}

void zero_buffers(std::initializer_list<at::Tensor> tensors, cudaStream_t stream) {
  ZeroList list{};
  int64_t most = 0;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    TORCH_CHECK(list.count < ZeroList::kMax, "neusdf: too many buffers to zero");
    list.ptr[list.count] = static_cast<uint32_t*>(t.data_ptr());
    list.words[list.count] = t.numel() * static_cast<int64_t>(t.element_size()) / 4;
    most = std::max(most, list.words[list.count]);
    ++list.count;
  }
  if (list.count == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((most + threads - 1) / threads, 1024);
  zero_buffers_kernel<<<blocks, threads, 0, stream>>>(list);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t power_of_two_at_least(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// The warp layout of the kernels for these sizes: `vector` channels a lane at a time (16
// bytes, or 1) where F % vector == 0 and every tensor of feature rows starts 16-byte aligned.
WarpLayout warp_layout(const ProblemSize& n, int64_t vector,
                       std::initializer_list<at::Tensor> rows) {
  bool aligned = n.F % vector == 0;
  for (const at::Tensor& t : rows)
    aligned = aligned && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  const int64_t V = aligned ? vector : 1;
  const int k_slots = static_cast<int>(std::min<int64_t>(power_of_two_at_least(n.K), kWarp));
  return {k_slots, __builtin_ctz(static_cast<unsigned>(k_slots)),
          static_cast<int>(std::min<int64_t>(power_of_two_at_least((n.F + V - 1) / V), kWarp)),
          static_cast<int>(V)};
}

// Channels a lane takes at a time in the kernels that scatter feature rows with atomics: 4
// (16 bytes) for float on sm_90, whose atomics add a float4 at once; otherwise 1, since a lane
// adding V separate channels makes each atomic instruction touch V times the sectors
// (float64 with V = 2 measured 1.5x slower than with single channels).
int64_t scatter_vector(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && device_facts(t.get_device()).major >= 9 ? 4 : 1;
}

// Blocks of kWarpsPerBlock warps, each holding 32 / k_slots queries.
int64_t layout_blocks(const ProblemSize& n, const WarpLayout& layout) {
  const int64_t per_warp = kWarp / layout.k_slots;
  const int64_t warps = (n.B * n.Q + per_warp - 1) / per_warp;
  return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_aggregate_cuda(
    const at::Tensor& q_in, const at::Tensor& p_in, const at::Tensor& f_in,
    const at::Tensor& sigma_in, const at::Tensor& R_in, const at::Tensor& idx_in,
    const std::optional<at::Tensor>& order_in) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  const at::Tensor order = check_order(order_in, n, q_in);
  at::Tensor f_out = at::empty({n.B, n.Q, n.F}, q_in.options());
  at::Tensor w = at::empty({n.B, n.Q, n.K}, q_in.options());
  at::Tensor dists = at::empty({n.B, n.Q, n.K}, q_in.options());
  if (n.B * n.Q == 0) return {f_out, w, dists};
  if (n.F == 0) f_out.zero_();
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const WarpLayout layout = warp_layout(n, q.scalar_type() == at::kFloat ? 4 : 2, {f});
  const int64_t blocks = layout_blocks(n, layout);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_cuda", [&] {
    using T = scalar_t;
    constexpr int kVector = std::is_same_v<T, float> ? 4 : 2;
    const auto kernel =
        layout.V == 1 ? knn_aggregate_kernel<T, 1> : knn_aggregate_kernel<T, kVector>;
    kernel<<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(
        q.data_ptr<T>(), p.data_ptr<T>(), f.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
        idx.data_ptr<int64_t>(), data_or_null<int64_t>(order), n, layout, f_out.data_ptr<T>(),
        w.data_ptr<T>(), dists.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f_out, w, dists};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_aggregate_backward_cuda(
    const std::optional<at::Tensor>& gf_in, const std::optional<at::Tensor>& gw_in,
    const std::optional<at::Tensor>& gD_in, const at::Tensor& q_in, const at::Tensor& p_in,
    const at::Tensor& f_in, const at::Tensor& sigma_in, const at::Tensor& R_in,
    const at::Tensor& idx_in, const std::optional<at::Tensor>& order_in) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  const at::Tensor order = check_order(order_in, n, q_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  const at::Tensor &gf = up.gf, &gw = up.gw, &gD = up.gD;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_q = at::empty_like(q_in, at::MemoryFormat::Contiguous);  // written whole
  at::Tensor grad_p = at::empty_like(p_in, at::MemoryFormat::Contiguous);  // accumulated:
  at::Tensor grad_f = at::empty_like(f_in, at::MemoryFormat::Contiguous);  // zeroed below
  at::Tensor grad_sigma = at::empty_like(sigma_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_R = at::empty_like(R_in, at::MemoryFormat::Contiguous);
  zero_buffers({grad_p, grad_f, grad_sigma, grad_R}, stream);
  if (n.B * n.Q == 0) return {grad_q, grad_p, grad_f, grad_sigma, grad_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  // gf, f and grad_f are read or written a row at a time: all must be 16-byte aligned for V > 1
  const WarpLayout layout = gf.defined() ? warp_layout(n, scatter_vector(q), {gf, f, grad_f})
                                          : warp_layout(n, scatter_vector(q), {f, grad_f});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_backward_cuda", [&] {
    using T = scalar_t;
    constexpr int kVector = std::is_same_v<T, float> ? 4 : 1;  // scatter_vector
    const auto kernel = layout.V == 1 ? knn_aggregate_backward_kernel<T, 1>
                                      : knn_aggregate_backward_kernel<T, kVector>;
    kernel<<<layout_blocks(n, layout), kWarpsPerBlock * kWarp, 0, stream>>>(
        data_or_null<T>(gf), data_or_null<T>(gw), data_or_null<T>(gD), q.data_ptr<T>(),
        p.data_ptr<T>(), f.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
        idx.data_ptr<int64_t>(), data_or_null<int64_t>(order), n, layout,
        grad_q.data_ptr<T>(), grad_p.data_ptr<T>(),
        grad_f.data_ptr<T>(), grad_sigma.data_ptr<T>(), grad_R.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_p, grad_f, grad_sigma, grad_R};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
knn_aggregate_double_backward_cuda(const at::Tensor& ggq_in,
                                   const std::optional<at::Tensor>& gf_in,
                                   const std::optional<at::Tensor>& gw_in,
                                   const std::optional<at::Tensor>& gD_in,
                                   const at::Tensor& q_in, const at::Tensor& p_in,
                                   const at::Tensor& f_in, const at::Tensor& sigma_in,
                                   const at::Tensor& R_in, const at::Tensor& idx_in,
                                   const std::optional<at::Tensor>& order_in) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  check_upstream(ggq_in, "ggq", {n.B, n.Q, 3}, q_in);
  const at::Tensor order = check_order(order_in, n, q_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  const at::Tensor &gf = up.gf, &gw = up.gw, &gD = up.gD;
  const auto opts = q_in.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The gradient of an absent upstream is empty (its input is None).
  const auto upstream_grad = [&](const at::Tensor& g) {
    return g.defined() ? at::empty_like(g) : at::empty({0}, opts);
  };
  at::Tensor g_gf = upstream_grad(gf);  // written whole by the kernel
  at::Tensor g_gw = upstream_grad(gw);  // zeroed below (pairs with a bad index skip them)
  at::Tensor g_gD = upstream_grad(gD);
  at::Tensor g_q = at::empty({n.B, n.Q, 3}, opts);  // written whole
  at::Tensor g_p = at::empty({n.B, n.P, 3}, opts);  // accumulated: zeroed below
  at::Tensor g_f = at::empty({n.B, n.P, n.F}, opts);
  at::Tensor g_sigma = at::empty({n.B, n.P, 3}, opts);
  at::Tensor g_R = at::empty({n.B, n.P, 3, 3}, opts);
  zero_buffers({g_gw, g_gD, g_p, g_f, g_sigma, g_R}, stream);
  if (n.B * n.Q == 0) return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_sigma, g_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous(),
                   ggq = ggq_in.contiguous();
  // gf, f, g_f and g_gf are read or written a row at a time: 16-byte aligned for V > 1
  const WarpLayout layout = gf.defined()
                                ? warp_layout(n, scatter_vector(q), {gf, f, g_f, g_gf})
                                : warp_layout(n, scatter_vector(q), {f, g_f});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_double_backward_cuda", [&] {
    using T = scalar_t;
    T* none = nullptr;
    constexpr int kVector = std::is_same_v<T, float> ? 4 : 1;  // scatter_vector
    const auto kernel = layout.V == 1 ? knn_aggregate_double_backward_kernel<T, 1>
                                      : knn_aggregate_double_backward_kernel<T, kVector>;
    kernel<<<layout_blocks(n, layout), kWarpsPerBlock * kWarp, 0, stream>>>(
            ggq.data_ptr<T>(), data_or_null<T>(gf), data_or_null<T>(gw), data_or_null<T>(gD),
            q.data_ptr<T>(), p.data_ptr<T>(), f.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
            idx.data_ptr<int64_t>(), data_or_null<int64_t>(order), n, layout,
            gf.defined() ? g_gf.data_ptr<T>() : none, gw.defined() ? g_gw.data_ptr<T>() : none,
            gD.defined() ? g_gD.data_ptr<T>() : none, g_q.data_ptr<T>(), g_p.data_ptr<T>(),
            g_f.data_ptr<T>(), g_sigma.data_ptr<T>(), g_R.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_sigma, g_R};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CUDA, m) {
  m.impl("knn_aggregate", &neusdf::knn_aggregate_cuda);
  m.impl("knn_aggregate_backward", &neusdf::knn_aggregate_backward_cuda);
  m.impl("knn_aggregate_double_backward", &neusdf::knn_aggregate_double_backward_cuda);
}
