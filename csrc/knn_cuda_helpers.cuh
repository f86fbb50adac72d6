// Device and host helpers shared by the CUDA kernels of the op (knn_search_cuda.cu,
// knn_aggregate_cuda.cu): warp reductions, the geometry of the (query, neighbour) pair a lane
// holds, point-gradient scatters, and the loop over a warp's neighbours that reads and
// scatters feature rows.
//
// Names follow knn_aggregate.h: bq = b * Q + query (flat query index), pj = b * P + j (flat
// point index), t = bq * K + k (flat pair index); upstreams gf, gw, gD.
#pragma once

#include <cstdint>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"

namespace neusdf {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ------------------------------------------------------------ per-query warp kernels

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

// For this lane's channels of one neighbour row: returns sum_c gfq[c] * f_row[c] (this lane's
// part) and adds scale * gfq[c] to out_row[c] atomically. With `pairs` (float, F even, rows
// 8-byte aligned) a lane takes two channels at a time: half the loads and, on sm_90, half the
// atomics (one float2 atomic add).
template <typename T>
__device__ __forceinline__ T dot_and_scatter(const T* __restrict__ gfq, const T* __restrict__ f_row,
                                             T* __restrict__ out_row, T scale, int64_t F,
                                             int lane, bool pairs) {
  T part = 0;
  for (int64_t c = lane; c < F; c += kWarp) {
    const T gfc = gfq[c];
    part += gfc * f_row[c];
    atomicAdd(out_row + c, scale * gfc);
  }
  return part;
}

template <>
__device__ __forceinline__ float dot_and_scatter<float>(const float* __restrict__ gfq,
                                                        const float* __restrict__ f_row,
                                                        float* __restrict__ out_row, float scale,
                                                        int64_t F, int lane, bool pairs) {
  if (!pairs) {
    float part = 0;
    for (int64_t c = lane; c < F; c += kWarp) {
      const float gfc = gfq[c];
      part += gfc * f_row[c];
      atomicAdd(out_row + c, scale * gfc);
    }
    return part;
  }
  float part = 0;
  for (int64_t c = 2 * lane; c < F; c += 2 * kWarp) {
    const float2 g2 = *reinterpret_cast<const float2*>(gfq + c);
    const float2 f2 = *reinterpret_cast<const float2*>(f_row + c);
    part += g2.x * f2.x + g2.y * f2.y;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(out_row + c), make_float2(scale * g2.x, scale * g2.y));
#else
    atomicAdd(out_row + c, scale * g2.x);
    atomicAdd(out_row + c + 1, scale * g2.y);
#endif
  }
  return part;
}

// The neighbour loop of the backward and double-backward kernels. The warp holds nk <= 32
// neighbours of query bq, neighbour kk on lane kk (point j, coefficient scale; j = -1 for an
// invalid pair). Channels run across lanes: for each neighbour kk it adds scale_kk * gf[bq] to
// that point's row of grad_f and returns, on lane kk, gf[bq] . f[j_kk] (0 on other lanes and
// when gfq, the row gf[bq], is null). Must be called by the whole warp.
template <typename T>
__device__ __forceinline__ T neighbour_dots_and_scatter(const T* __restrict__ gfq,
                                                        const T* __restrict__ f,
                                                        T* __restrict__ grad_f, int64_t j,
                                                        T scale, int nk, int64_t b,
                                                        const ProblemSize& n, int lane,
                                                        bool pairs) {
  T dot = 0;
  if (gfq == nullptr) return dot;  // uniform across the warp
  for (int kk = 0; kk < nk; ++kk) {
    const int64_t jk = __shfl_sync(kFullMask, j, kk);
    const T scale_k = __shfl_sync(kFullMask, scale, kk);
    T part = 0;
    if (jk >= 0) {
      const int64_t row = (b * n.P + jk) * n.F;
      part = dot_and_scatter(gfq, f + row, grad_f + row, scale_k, n.F, lane, pairs);
    }
    part = warp_sum(part);
    if (lane == kk) dot = part;
  }
  return dot;
}

}  // namespace neusdf
