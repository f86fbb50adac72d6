// CUDA kernels of the anisotropic kNN aggregation (contracts in knn_aggregate.h).
//
// Search: a block takes 32 queries of one batch (one per lane) and W warps. The points stream
// through shared memory in tiles; warp w scans points w, w + W, ... of each tile, so all lanes
// of a warp read the same point (a broadcast, no bank conflicts) and each lane keeps the N best
// (key, index) pairs it has seen in registers (N = K rounded up to a power of two, so that the
// list is indexed by compile-time constants only). At the end the W lists of each query are
// merged through shared memory. No (B, Q, P) tensor ever exists. K > 32 uses a simple kernel
// that keeps the list in global memory (correct, not fast).
//
// Aggregate, backward and double backward: one warp per query. Lanes take the K neighbours
// for the per-pair geometry, then the F feature channels for the feature sums, so every
// feature row is read and scattered with coalesced accesses. Gradients of points (shared by
// many queries) are scattered with atomics; their order varies, so the CUDA gradients are
// deterministic only up to rounding.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"

namespace neusdf {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kQueriesPerWarpBlock = 8;  // warps (= queries) per block of the warp-per-query kernels

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ------------------------------------------------------------------------------- search

// One point as the search reads it from shared memory: position, precisions, axes.
template <typename T>
struct alignas(16) PointRec {
  T p[3];
  T s[3];
  T R[9];
  T pad;
};

// Inserts (k, j) into the sorted list (key, ind) of N entries, dropping the last one.
// Precondition: (k, j) comes before the last entry. kLex = false is the fast path of the
// scan, where j is larger than every index in the list, so "comes before" is key < key.
template <typename T, int N, bool kLex>
__device__ __forceinline__ void insert_sorted(T (&key)[N], int (&ind)[N], T k, int j) {
  bool c_hi = true;
#pragma unroll
  for (int s = N - 1; s > 0; --s) {
    const bool c_lo = kLex ? comes_before<T>(k, j, key[s - 1], ind[s - 1]) : k < key[s - 1];
    key[s] = c_lo ? key[s - 1] : (c_hi ? k : key[s]);
    ind[s] = c_lo ? ind[s - 1] : (c_hi ? j : ind[s]);
    c_hi = c_lo;
  }
  if (c_hi) {
    key[0] = k;
    ind[0] = j;
  }
}

template <typename T>
__host__ __device__ constexpr int search_tile() {
  return sizeof(T) == 4 ? 256 : 128;  // 16 KiB of shared memory either way
}

constexpr int kQueue = 8;   // candidates a lane may queue before its warp merges them
constexpr int kUnroll = 4;  // points a lane scans per step (kUnroll <= kQueue)

// Shared memory of the search: the point tile, reused for merging the warps' lists, followed
// by the per-lane candidate queues.
template <typename T, int N>
__host__ __device__ constexpr size_t search_list_bytes() {
  return sizeof(PointRec<T>) * search_tile<T>() > (sizeof(T) + sizeof(int)) * N * kWarp
             ? sizeof(PointRec<T>) * search_tile<T>()
             : (sizeof(T) + sizeof(int)) * N * kWarp;
}

template <typename T, int N>
size_t search_smem_bytes(int warps) {
  return search_list_bytes<T, N>() + (sizeof(T) + sizeof(int)) * kQueue * kWarp * warps;
}

template <typename T, int N>
__global__ void knn_search_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                  const T* __restrict__ sig, const T* __restrict__ Rm, int Q,
                                  int P, int K, int64_t* __restrict__ idx) {
  constexpr int kTile = search_tile<T>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PointRec<T>* tile = reinterpret_cast<PointRec<T>*>(smem_raw);

  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int qblocks = (Q + kWarp - 1) / kWarp;
  const int64_t b = blockIdx.x / qblocks;
  const int qi = (blockIdx.x % qblocks) * kWarp + lane;
  const bool active = qi < Q;
  const int64_t bq = b * Q + qi;

  T qv[3] = {0, 0, 0};
  if (active) {
#pragma unroll
    for (int c = 0; c < 3; ++c) qv[c] = q[3 * bq + c];
  }
  T key[N];
  int ind[N];
#pragma unroll
  for (int s = 0; s < N; ++s) {
    key[s] = INFINITY;  // above every search key, so the first N points always get in
    ind[s] = INT_MAX;
  }

  // Candidates that pass the gate (this lane's N-th best when the queue was last merged) wait
  // in a per-lane queue in shared memory; the list is updated only when some lane's queue is
  // full, so the warp runs the (divergent) insertion code far less often than once a point.
  T* queue_key = reinterpret_cast<T*>(smem_raw + search_list_bytes<T, N>()) +
                 warp * kQueue * kWarp;
  int* queue_ind = reinterpret_cast<int*>(smem_raw + search_list_bytes<T, N>() +
                                          sizeof(T) * warps * kQueue * kWarp) +
                   warp * kQueue * kWarp;
  int queued = 0;
  T gate = key[N - 1];
  const auto merge_queue = [&]() {
#pragma unroll
    for (int s = 0; s < kQueue; ++s) {
      if (s < queued) {
        const T k = queue_key[s * kWarp + lane];
        if (k < key[N - 1]) insert_sorted<T, N, false>(key, ind, k, queue_ind[s * kWarp + lane]);
      }
    }
    queued = 0;
    gate = key[N - 1];
  };

  const T* pb = p + b * P * 3;
  const T* sb = sig + b * P * 3;
  const T* Rb = Rm + b * P * 9;
  for (int start = 0; start < P; start += kTile) {
    const int count = min(kTile, P - start);
    __syncthreads();  // the previous tile is no longer read
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
      const int64_t j = start + t;
      PointRec<T> rec;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        rec.p[c] = pb[3 * j + c];
        rec.s[c] = sb[3 * j + c];
      }
#pragma unroll
      for (int c = 0; c < 9; ++c) rec.R[c] = Rb[9 * j + c];
      rec.pad = 0;
      tile[t] = rec;
    }
    __syncthreads();
    // kUnroll points per step: independent distance chains for ILP, one vote per step. The
    // loop bounds are uniform across the warp, so the vote is safe.
    for (int t0 = warp; t0 < count; t0 += kUnroll * warps) {
      T k[kUnroll];
#pragma unroll
      for (int x = 0; x < kUnroll; ++x) {
        const int t = t0 + x * warps;
        k[x] = INFINITY;  // never below the gate
        if (t < count) {
          const PointRec<T>& r = tile[t];
          T d[3], u[3];
          k[x] = search_key(pair_distance(qv, r.p, r.s, r.R, d, u));
        }
      }
#pragma unroll
      for (int x = 0; x < kUnroll; ++x) {
        if (active && k[x] < gate) {
          queue_key[queued * kWarp + lane] = k[x];
          queue_ind[queued * kWarp + lane] = start + t0 + x * warps;
          ++queued;
        }
      }
      if (__any_sync(kFullMask, queued > kQueue - kUnroll)) merge_queue();
    }
  }
  merge_queue();

  // Merge the other warps' lists into warp 0's, one warp at a time, through shared memory.
  T* buf_key = reinterpret_cast<T*>(smem_raw);
  int* buf_ind = reinterpret_cast<int*>(smem_raw + sizeof(T) * N * kWarp);
  for (int src = 1; src < warps; ++src) {
    __syncthreads();
    if (warp == src) {
#pragma unroll
      for (int s = 0; s < N; ++s) {
        buf_key[s * kWarp + lane] = key[s];
        buf_ind[s * kWarp + lane] = ind[s];
      }
    }
    __syncthreads();
    if (warp == 0 && active) {
      for (int s = 0; s < N; ++s) {
        const T k = buf_key[s * kWarp + lane];
        const int j = buf_ind[s * kWarp + lane];
        if (!comes_before<T>(k, j, key[N - 1], ind[N - 1])) break;  // the rest is worse
        insert_sorted<T, N, true>(key, ind, k, j);
      }
    }
  }
  if (warp == 0 && active) {
#pragma unroll
    for (int s = 0; s < N; ++s) {
      if (s < K) idx[bq * K + s] = ind[s];
    }
  }
}

// K > 32: one thread per query, its sorted list kept in global memory (keys in a scratch
// buffer, indices in the output). Insertion is O(K) with run-time indices; correct, not fast.
template <typename T>
__global__ void knn_search_large_k_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                          const T* __restrict__ sig, const T* __restrict__ Rm,
                                          int64_t BQ, int Q, int P, int K, T* __restrict__ keys,
                                          int64_t* __restrict__ idx) {
  const int64_t bq = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bq >= BQ) return;
  const int64_t b = bq / Q;
  T* kl = keys + bq * K;
  int64_t* il = idx + bq * K;
  for (int s = 0; s < K; ++s) {
    kl[s] = INFINITY;
    il[s] = 0;
  }
  T qv[3] = {q[3 * bq], q[3 * bq + 1], q[3 * bq + 2]};
  for (int j = 0; j < P; ++j) {
    const int64_t pj = b * P + j;
    T d[3], u[3];
    const T k = search_key(pair_distance(qv, p + 3 * pj, sig + 3 * pj, Rm + 9 * pj, d, u));
    if (!(k < kl[K - 1])) continue;
    int s = K - 1;
    for (; s > 0 && k < kl[s - 1]; --s) {
      kl[s] = kl[s - 1];
      il[s] = il[s - 1];
    }
    kl[s] = k;
    il[s] = j;
  }
}

// Warps per search block: enough blocks x warps to fill the GPU, at most 4 (on an H100, 4 beat
// 2, 6 and 8 at P = 4096 and P = 65536: benchmarks/RESULTS.md). NEUSDF_SEARCH_WARPS (1..8)
// overrides the choice, for tuning.
int search_warps(int64_t blocks) {
  if (const char* env = std::getenv("NEUSDF_SEARCH_WARPS")) {
    const int w = std::atoi(env);
    if (w >= 1 && w <= 8) return w;
  }
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t target = static_cast<int64_t>(sms) * 32;  // resident warps to aim for
  return static_cast<int>(std::min<int64_t>(4, std::max<int64_t>(1, (target + blocks - 1) / blocks)));
}

template <typename T, int N>
void launch_search(const at::Tensor& q, const at::Tensor& p, const at::Tensor& s,
                   const at::Tensor& R, const ProblemSize& n, at::Tensor& idx,
                   cudaStream_t stream) {
  const int64_t blocks = n.B * ((n.Q + kWarp - 1) / kWarp);
  const int warps = search_warps(blocks);
  const size_t smem = search_smem_bytes<T, N>(warps);
  knn_search_kernel<T, N><<<blocks, warps * kWarp, smem, stream>>>(
      q.data_ptr<T>(), p.data_ptr<T>(), s.data_ptr<T>(), R.data_ptr<T>(), n.Q, n.P, n.K,
      idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor knn_search_cuda(const at::Tensor& q_in, const at::Tensor& p_in,
                           const at::Tensor& sigma_in, const at::Tensor& R_in, int64_t K) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_points(q_in, p_in, sigma_in, R_in, K);
  TORCH_CHECK(n.P < INT_MAX && n.Q < INT_MAX, "neusdf: knn_search supports P, Q < 2^31 on CUDA");
  TORCH_CHECK(n.B * ((n.Q + kWarp - 1) / kWarp) < INT_MAX, "neusdf: B * Q too large");
  at::Tensor idx = at::empty({n.B, n.Q, K}, q_in.options().dtype(at::kLong));
  if (n.B * n.Q == 0) return idx;
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), s = sigma_in.contiguous(),
                   R = R_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_search_cuda", [&] {
    using T = scalar_t;
    if (K <= 1) {
      launch_search<T, 1>(q, p, s, R, n, idx, stream);
    } else if (K <= 2) {
      launch_search<T, 2>(q, p, s, R, n, idx, stream);
    } else if (K <= 4) {
      launch_search<T, 4>(q, p, s, R, n, idx, stream);
    } else if (K <= 8) {
      launch_search<T, 8>(q, p, s, R, n, idx, stream);
    } else if (K <= 16) {
      launch_search<T, 16>(q, p, s, R, n, idx, stream);
    } else if (K <= 32) {
      launch_search<T, 32>(q, p, s, R, n, idx, stream);
    } else {
      at::Tensor keys = at::empty({n.B, n.Q, K}, q.options());
      const int threads = 128;
      const int64_t blocks = (n.B * n.Q + threads - 1) / threads;
      knn_search_large_k_kernel<T><<<blocks, threads, 0, stream>>>(
          q.data_ptr<T>(), p.data_ptr<T>(), s.data_ptr<T>(), R.data_ptr<T>(), n.B * n.Q, n.Q,
          n.P, n.K, keys.data_ptr<T>(), idx.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return idx;
}

// ------------------------------------------------------------- per-query warp kernels

// The geometry of the pair a lane holds. ok is false for lanes past K and for invalid indices.
template <typename T>
struct LanePair {
  bool ok;
  int64_t j;  // point index within the batch, -1 when not ok
  T d[3], u[3], g[3], s[3], R[9], D, w;
};

template <typename T>
__device__ __forceinline__ void load_lane_pair(const T* __restrict__ p, const T* __restrict__ sig,
                                               const T* __restrict__ Rm,
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
    pr.s[c] = sig[3 * pj + c];
  }
#pragma unroll
  for (int c = 0; c < 9; ++c) pr.R[c] = Rm[9 * pj + c];
  pr.D = pair_distance(qv, pv, pr.s, pr.R, pr.d, pr.u);
  pr.w = exp(-pr.D);
  scaled_transpose(pr.s, pr.R, pr.u, pr.g);
}

template <typename T>
__device__ __forceinline__ void atomic_add_point_terms(int64_t pj, const T gp[3], const T gs[3],
                                                       const T gR[9], T* __restrict__ out_p,
                                                       T* __restrict__ out_s,
                                                       T* __restrict__ out_R) {
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    atomicAdd(out_p + 3 * pj + c, gp[c]);
    atomicAdd(out_s + 3 * pj + c, gs[c]);
  }
#pragma unroll
  for (int c = 0; c < 9; ++c) atomicAdd(out_R + 9 * pj + c, gR[c]);
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

// Whether dot_and_scatter may take channel pairs: float rows of even length, 8-byte aligned.
bool channel_pairs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t F) {
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0;
  };
  return a.scalar_type() == at::kFloat && F % 2 == 0 && aligned(a) && aligned(b) && aligned(c);
}

template <typename T>
__global__ void knn_aggregate_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                     const T* __restrict__ f, const T* __restrict__ sig,
                                     const T* __restrict__ Rm, const int64_t* __restrict__ idx,
                                     ProblemSize n, T* __restrict__ f_out, T* __restrict__ w_out,
                                     T* __restrict__ D_out) {
  const int64_t bq = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bq >= n.B * n.Q) return;  // whole warps leave together
  const int64_t b = bq / n.Q;
  const T qv[3] = {q[3 * bq], q[3 * bq + 1], q[3 * bq + 2]};
  const T nan = NAN;
  for (int64_t k0 = 0; k0 < n.K; k0 += kWarp) {
    const int64_t t = bq * n.K + k0 + lane;
    const bool in_range = k0 + lane < n.K;
    LanePair<T> pr;
    load_lane_pair(p, sig, Rm, idx, qv, b, t, in_range, n.P, pr);
    if (in_range) {
      w_out[t] = pr.ok ? pr.w : nan;
      D_out[t] = pr.ok ? pr.D : nan;
    }
    const int nk = static_cast<int>(n.K - k0 < kWarp ? n.K - k0 : kWarp);
    // Chunks of 32 channels with the same trip count on every lane: the shuffles inside need
    // the whole warp.
    for (int64_t c0 = 0; c0 < n.F; c0 += kWarp) {
      const int64_t c = c0 + lane;
      const bool has_c = c < n.F;
      T acc = (k0 == 0 || !has_c) ? T(0) : f_out[bq * n.F + c];
      for (int kk = 0; kk < nk; ++kk) {
        const int64_t jk = __shfl_sync(kFullMask, pr.j, kk);
        const T wk = __shfl_sync(kFullMask, pr.w, kk);
        if (has_c) acc = jk >= 0 ? acc + wk * f[(b * n.P + jk) * n.F + c] : nan;
      }
      if (has_c) f_out[bq * n.F + c] = acc;
    }
  }
}

template <typename T>
__global__ void knn_aggregate_backward_kernel(
    const T* __restrict__ gf, const T* __restrict__ gw, const T* __restrict__ gD,
    const T* __restrict__ q, const T* __restrict__ p, const T* __restrict__ f,
    const T* __restrict__ sig, const T* __restrict__ Rm, const int64_t* __restrict__ idx,
    ProblemSize n, bool pairs, T* __restrict__ out_q, T* __restrict__ out_p,
    T* __restrict__ out_f, T* __restrict__ out_s, T* __restrict__ out_R) {
  const int64_t bq = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bq >= n.B * n.Q) return;
  const int64_t b = bq / n.Q;
  const T qv[3] = {q[3 * bq], q[3 * bq + 1], q[3 * bq + 2]};
  // Absent upstreams (null) count as zero; the null tests are uniform across the warp.
  const T* gfq = gf ? gf + bq * n.F : nullptr;
  T gq[3] = {0, 0, 0};
  for (int64_t k0 = 0; k0 < n.K; k0 += kWarp) {
    const int64_t t = bq * n.K + k0 + lane;
    LanePair<T> pr;
    load_lane_pair(p, sig, Rm, idx, qv, b, t, k0 + lane < n.K, n.P, pr);
    const int nk = static_cast<int>(n.K - k0 < kWarp ? n.K - k0 : kWarp);
    // Feature channels across lanes: dot_k = grad_f . f_k, and grad f_k += w_k grad_f.
    T dot = 0;
    for (int kk = 0; gfq != nullptr && kk < nk; ++kk) {
      const int64_t jk = __shfl_sync(kFullMask, pr.j, kk);
      const T wk = __shfl_sync(kFullMask, pr.w, kk);
      T part = 0;
      if (jk >= 0) {
        const int64_t row = (b * n.P + jk) * n.F;
        part = dot_and_scatter(gfq, f + row, out_f + row, wk, n.F, lane, pairs);
      }
      part = warp_sum(part);
      if (lane == kk) dot = part;
    }
    if (pr.ok) {
      const T dbar = (gD ? gD[t] : T(0)) - pr.w * (dot + (gw ? gw[t] : T(0)));
#pragma unroll
      for (int c = 0; c < 3; ++c) gq[c] += dbar * pr.g[c];
      T gp[3] = {0, 0, 0}, gs[3] = {0, 0, 0}, gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      add_first_order_point_terms(dbar, pr.s, pr.d, pr.u, pr.g, gp, gs, gR);
      atomic_add_point_terms(b * n.P + pr.j, gp, gs, gR, out_p, out_s, out_R);
    }
  }
#pragma unroll
  for (int c = 0; c < 3; ++c) gq[c] = warp_sum(gq[c]);
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < 3; ++c) out_q[3 * bq + c] = gq[c];
  }
}

template <typename T>
__global__ void knn_aggregate_double_backward_kernel(
    const T* __restrict__ ggq, const T* __restrict__ gf, const T* __restrict__ gw,
    const T* __restrict__ gD, const T* __restrict__ q, const T* __restrict__ p,
    const T* __restrict__ f, const T* __restrict__ sig, const T* __restrict__ Rm,
    const int64_t* __restrict__ idx, ProblemSize n, bool pairs, T* __restrict__ g_gf,
    T* __restrict__ g_gw,
    T* __restrict__ g_gD, T* __restrict__ g_q, T* __restrict__ g_p, T* __restrict__ g_f,
    T* __restrict__ g_s, T* __restrict__ g_R) {
  const int64_t bq = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bq >= n.B * n.Q) return;
  const int64_t b = bq / n.Q;
  const T qv[3] = {q[3 * bq], q[3 * bq + 1], q[3 * bq + 2]};
  const T e[3] = {ggq[3 * bq], ggq[3 * bq + 1], ggq[3 * bq + 2]};
  // Absent upstreams (null) count as zero and have no gradient to write.
  const T* gfq = gf ? gf + bq * n.F : nullptr;
  T gq[3] = {0, 0, 0};
  for (int64_t k0 = 0; k0 < n.K; k0 += kWarp) {
    const int64_t t = bq * n.K + k0 + lane;
    LanePair<T> pr;
    load_lane_pair(p, sig, Rm, idx, qv, b, t, k0 + lane < n.K, n.P, pr);
    const T es = pr.ok ? e[0] * pr.g[0] + e[1] * pr.g[1] + e[2] * pr.g[2] : T(0);
    const T ws = pr.w * es;  // w_k (e . g_k)
    const int nk = static_cast<int>(n.K - k0 < kWarp ? n.K - k0 : kWarp);
    // Pass over neighbours: dot_k = grad_f . f_k, and g_f[k] -= ws_k grad_f.
    T dot = 0;
    for (int kk = 0; gfq != nullptr && kk < nk; ++kk) {
      const int64_t jk = __shfl_sync(kFullMask, pr.j, kk);
      const T wsk = __shfl_sync(kFullMask, ws, kk);
      T part = 0;
      if (jk >= 0) {
        const int64_t row = (b * n.P + jk) * n.F;
        part = dot_and_scatter(gfq, f + row, g_f + row, -wsk, n.F, lane, pairs);
      }
      part = warp_sum(part);
      if (lane == kk) dot = part;
    }
    // Pass over channels: g_grad_f[c] -= sum_k ws_k f_k[c] (this warp owns the row).
    for (int64_t c0 = 0; gfq != nullptr && c0 < n.F; c0 += kWarp) {  // uniform trip count
      const int64_t c = c0 + lane;
      const bool has_c = c < n.F;
      T acc = (k0 == 0 || !has_c) ? T(0) : g_gf[bq * n.F + c];
      for (int kk = 0; kk < nk; ++kk) {
        const int64_t jk = __shfl_sync(kFullMask, pr.j, kk);
        const T wsk = __shfl_sync(kFullMask, ws, kk);
        if (has_c && jk >= 0) acc -= wsk * f[(b * n.P + jk) * n.F + c];
      }
      if (has_c) g_gf[bq * n.F + c] = acc;
    }
    if (pr.ok) {
      const T inner = dot + (gw ? gw[t] : T(0));
      const T dbar = (gD ? gD[t] : T(0)) - pr.w * inner;
      const T E = es * pr.w * inner;
      if (gD) g_gD[t] = es;
      if (gw) g_gw[t] = -ws;
      T a[3], h[3];
      hessian_times(pr.s, pr.R, e, a, h);
#pragma unroll
      for (int c = 0; c < 3; ++c) gq[c] += E * pr.g[c] + dbar * h[c];
      T gp[3] = {0, 0, 0}, gs[3] = {0, 0, 0}, gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      add_first_order_point_terms(E, pr.s, pr.d, pr.u, pr.g, gp, gs, gR);
      add_second_order_point_terms(dbar, e, pr.s, pr.R, pr.d, pr.u, gp, gs, gR);
      atomic_add_point_terms(b * n.P + pr.j, gp, gs, gR, g_p, g_s, g_R);
    }
  }
#pragma unroll
  for (int c = 0; c < 3; ++c) gq[c] = warp_sum(gq[c]);
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < 3; ++c) g_q[3 * bq + c] = gq[c];
  }
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

int64_t warp_blocks(const ProblemSize& n) {
  return (n.B * n.Q + kQueriesPerWarpBlock - 1) / kQueriesPerWarpBlock;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_aggregate_cuda(
    const at::Tensor& q_in, const at::Tensor& p_in, const at::Tensor& f_in,
    const at::Tensor& sigma_in, const at::Tensor& R_in, const at::Tensor& idx_in) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  at::Tensor f_out = at::empty({n.B, n.Q, n.F}, q_in.options());
  at::Tensor w = at::empty({n.B, n.Q, n.K}, q_in.options());
  at::Tensor D = at::empty({n.B, n.Q, n.K}, q_in.options());
  if (n.B * n.Q == 0) return {f_out, w, D};
  if (n.F == 0) f_out.zero_();
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   s = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_cuda", [&] {
    using T = scalar_t;
    knn_aggregate_kernel<T><<<warp_blocks(n), kQueriesPerWarpBlock * kWarp, 0, stream>>>(
        q.data_ptr<T>(), p.data_ptr<T>(), f.data_ptr<T>(), s.data_ptr<T>(), R.data_ptr<T>(),
        idx.data_ptr<int64_t>(), n, f_out.data_ptr<T>(), w.data_ptr<T>(), D.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f_out, w, D};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_aggregate_backward_cuda(
    const std::optional<at::Tensor>& gf_in, const std::optional<at::Tensor>& gw_in,
    const std::optional<at::Tensor>& gD_in, const at::Tensor& q_in, const at::Tensor& p_in,
    const at::Tensor& f_in, const at::Tensor& sigma_in, const at::Tensor& R_in,
    const at::Tensor& idx_in) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  const Upstreams up = check_upstreams(gf_in, gw_in, gD_in, n, q_in);
  const at::Tensor &gf = up.gf, &gw = up.gw, &gD = up.gD;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gq = at::empty_like(q_in, at::MemoryFormat::Contiguous);  // written whole
  at::Tensor gp = at::empty_like(p_in, at::MemoryFormat::Contiguous);  // accumulated:
  at::Tensor gfi = at::empty_like(f_in, at::MemoryFormat::Contiguous);  // zeroed below
  at::Tensor gs = at::empty_like(sigma_in, at::MemoryFormat::Contiguous);
  at::Tensor gR = at::empty_like(R_in, at::MemoryFormat::Contiguous);
  zero_buffers({gp, gfi, gs, gR}, stream);
  if (n.B * n.Q == 0) return {gq, gp, gfi, gs, gR};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   s = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_backward_cuda", [&] {
    using T = scalar_t;
    knn_aggregate_backward_kernel<T><<<warp_blocks(n), kQueriesPerWarpBlock * kWarp, 0, stream>>>(
        data_or_null<T>(gf), data_or_null<T>(gw), data_or_null<T>(gD), q.data_ptr<T>(),
        p.data_ptr<T>(), f.data_ptr<T>(), s.data_ptr<T>(), R.data_ptr<T>(),
        idx.data_ptr<int64_t>(), n, gf.defined() && channel_pairs(gf, f, gfi, n.F),
        gq.data_ptr<T>(), gp.data_ptr<T>(), gfi.data_ptr<T>(), gs.data_ptr<T>(),
        gR.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gq, gp, gfi, gs, gR};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
knn_aggregate_double_backward_cuda(const at::Tensor& ggq_in,
                                   const std::optional<at::Tensor>& gf_in,
                                   const std::optional<at::Tensor>& gw_in,
                                   const std::optional<at::Tensor>& gD_in,
                                   const at::Tensor& q_in, const at::Tensor& p_in,
                                   const at::Tensor& f_in, const at::Tensor& sigma_in,
                                   const at::Tensor& R_in, const at::Tensor& idx_in) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_aggregate(q_in, p_in, f_in, sigma_in, R_in, idx_in);
  check_upstream(ggq_in, "ggq", {n.B, n.Q, 3}, q_in);
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
  at::Tensor g_s = at::empty({n.B, n.P, 3}, opts);
  at::Tensor g_R = at::empty({n.B, n.P, 3, 3}, opts);
  zero_buffers({g_gw, g_gD, g_p, g_f, g_s, g_R}, stream);
  if (n.B * n.Q == 0) return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_s, g_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   s = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous(),
                   ggq = ggq_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_double_backward_cuda", [&] {
    using T = scalar_t;
    T* none = nullptr;
    knn_aggregate_double_backward_kernel<T>
        <<<warp_blocks(n), kQueriesPerWarpBlock * kWarp, 0, stream>>>(
            ggq.data_ptr<T>(), data_or_null<T>(gf), data_or_null<T>(gw), data_or_null<T>(gD),
            q.data_ptr<T>(), p.data_ptr<T>(), f.data_ptr<T>(), s.data_ptr<T>(), R.data_ptr<T>(),
            idx.data_ptr<int64_t>(), n, gf.defined() && channel_pairs(gf, f, g_f, n.F),
            gf.defined() ? g_gf.data_ptr<T>() : none, gw.defined() ? g_gw.data_ptr<T>() : none,
            gD.defined() ? g_gD.data_ptr<T>() : none, g_q.data_ptr<T>(), g_p.data_ptr<T>(),
            g_f.data_ptr<T>(), g_s.data_ptr<T>(), g_R.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_s, g_R};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CUDA, m) {
  m.impl("knn_search", &neusdf::knn_search_cuda);
  m.impl("knn_aggregate", &neusdf::knn_aggregate_cuda);
  m.impl("knn_aggregate_backward", &neusdf::knn_aggregate_backward_cuda);
  m.impl("knn_aggregate_double_backward", &neusdf::knn_aggregate_double_backward_cuda);
}
