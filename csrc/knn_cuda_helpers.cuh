// Device and host helpers shared by the CUDA kernels of the op (knn_search_cuda.cu,
// knn_aggregate_cuda.cu): the warp's constants, the devices' attributes, the geometry of the
// (query, neighbour) pair a lane holds, and its point-gradient scatters.
//
// Names follow knn_aggregate.h: bq = b * Q + query (flat query index), pj = b * P + j (flat
// point index), t = bq * K + k (flat pair index); upstreams gf, gw, gD.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"

namespace neusdf {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// What the launches need to know of a device, read for every visible device once per process
// (no CUDA call per op call).
struct DeviceFacts {
  int multiprocessors;
  int major;  // compute capability
};

inline const DeviceFacts& device_facts(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<DeviceFacts> facts;
  std::call_once(once, [] {
    std::vector<DeviceFacts> read(c10::cuda::device_count());
    for (size_t d = 0; d < read.size(); ++d) {
      const int index = static_cast<int>(d);
      C10_CUDA_CHECK(
          cudaDeviceGetAttribute(&read[d].multiprocessors, cudaDevAttrMultiProcessorCount, index));
      C10_CUDA_CHECK(
          cudaDeviceGetAttribute(&read[d].major, cudaDevAttrComputeCapabilityMajor, index));
    }
    facts = std::move(read);  // only after every query succeeded (a throw lets a later call retry)
  });
  return facts.at(device);
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

}  // namespace neusdf
