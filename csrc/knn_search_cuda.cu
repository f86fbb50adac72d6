// CUDA kernels of the anisotropic kNN search (contract of knn_search in knn_aggregate.h).
//
// Brute force: a block takes 32 queries of one batch (one per lane) and W warps. The points
// stream through shared memory in tiles; warp w scans points w, w + W, ... of each tile, so all
// lanes of a warp read the same point (a broadcast, no bank conflicts) and each lane keeps the
// N best (key, index) pairs it has seen in registers (N = K rounded up to a power of two, so
// that the list is indexed by compile-time constants only). At the end the W lists of each
// query are merged through shared memory. No (B, Q, P) tensor ever exists. K > 32 uses a
// simple kernel that keeps the list in global memory (correct, not fast).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"
#include "knn_cuda_helpers.cuh"

namespace neusdf {
namespace {

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

// A lane's N best (key, index) pairs so far, ascending, in registers.
template <typename T, int N>
struct LaneList {
  T key[N];
  int ind[N];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int s = 0; s < N; ++s) {
      key[s] = INFINITY;  // above every search key, so the first N points always get in
      ind[s] = INT_MAX;
    }
  }
};

// Candidates that pass the gate (the lane's N-th best key when the queue was last merged) wait
// in a per-lane queue in shared memory; the list is updated only when some lane's queue is
// nearly full, so the warp runs the (divergent) insertion code far less often than once a point.
// Slot s of lane l is at [s * kWarp + l]: the lanes of a warp write consecutive words.
template <typename T, int N>
struct LaneQueue {
  T* key;
  int* ind;
  int queued;
  T gate;

  __device__ __forceinline__ void push(T k, int j, int lane) {
    key[queued * kWarp + lane] = k;
    ind[queued * kWarp + lane] = j;
    ++queued;
  }

  // Inserts the queued candidates into the list (their indices exceed every index in it, so
  // "comes before" is "smaller key"), empties the queue and raises the gate.
  __device__ __forceinline__ void merge_into(LaneList<T, N>& list, int lane) {
#pragma unroll
    for (int s = 0; s < kQueue; ++s) {
      if (s < queued) {
        const T k = key[s * kWarp + lane];
        if (k < list.key[N - 1]) {
          insert_sorted<T, N, false>(list.key, list.ind, k, ind[s * kWarp + lane]);
        }
      }
    }
    queued = 0;
    gate = list.key[N - 1];
  }
};

// Copies points [start, start + count) of one batch into the shared tile (whole block).
template <typename T>
__device__ __forceinline__ void stage_tile(PointRec<T>* tile, const T* __restrict__ pb,
                                           const T* __restrict__ sb, const T* __restrict__ Rb,
                                           int start, int count) {
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
}

// Scans this warp's share of a staged tile (points warp, warp + warps, ...) for the lane's
// query: kUnroll points per step (independent distance chains for ILP) and one warp vote per
// step. The loop bounds are uniform across the warp, so the vote is safe.
template <typename T, int N>
__device__ __forceinline__ void scan_tile(const PointRec<T>* tile, int start, int count,
                                          const T qv[3], bool active, int warp, int warps,
                                          int lane, LaneList<T, N>& list,
                                          LaneQueue<T, N>& queue) {
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
      if (active && k[x] < queue.gate) queue.push(k[x], start + t0 + x * warps, lane);
    }
    if (__any_sync(kFullMask, queue.queued > kQueue - kUnroll)) queue.merge_into(list, lane);
  }
}

// Merges the other warps' lists into warp 0's, one warp at a time, through shared memory
// (buf: N * kWarp keys, then N * kWarp indices). Whole block.
template <typename T, int N>
__device__ __forceinline__ void merge_warp_lists(unsigned char* buf, int warp, int warps,
                                                 int lane, bool active, LaneList<T, N>& list) {
  T* buf_key = reinterpret_cast<T*>(buf);
  int* buf_ind = reinterpret_cast<int*>(buf + sizeof(T) * N * kWarp);
  for (int src = 1; src < warps; ++src) {
    __syncthreads();
    if (warp == src) {
#pragma unroll
      for (int s = 0; s < N; ++s) {
        buf_key[s * kWarp + lane] = list.key[s];
        buf_ind[s * kWarp + lane] = list.ind[s];
      }
    }
    __syncthreads();
    if (warp == 0 && active) {
      for (int s = 0; s < N; ++s) {
        const T k = buf_key[s * kWarp + lane];
        const int j = buf_ind[s * kWarp + lane];
        if (!comes_before<T>(k, j, list.key[N - 1], list.ind[N - 1])) break;  // the rest is worse
        insert_sorted<T, N, true>(list.key, list.ind, k, j);
      }
    }
  }
}

template <typename T, int N>
__global__ void knn_search_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                  const T* __restrict__ sigma, const T* __restrict__ R, int Q,
                                  int P, int K, int64_t* __restrict__ idx) {
  constexpr int kTile = search_tile<T>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PointRec<T>* tile = reinterpret_cast<PointRec<T>*>(smem_raw);

  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int qblocks = (Q + kWarp - 1) / kWarp;
  const int64_t b = blockIdx.x / qblocks;
  const int query = (blockIdx.x % qblocks) * kWarp + lane;
  const bool active = query < Q;
  const int64_t bq = b * Q + query;

  T qv[3] = {0, 0, 0};
  if (active) {
#pragma unroll
    for (int c = 0; c < 3; ++c) qv[c] = q[3 * bq + c];
  }
  LaneList<T, N> list;
  list.clear();
  LaneQueue<T, N> queue;
  queue.key = reinterpret_cast<T*>(smem_raw + search_list_bytes<T, N>()) + warp * kQueue * kWarp;
  queue.ind = reinterpret_cast<int*>(smem_raw + search_list_bytes<T, N>() +
                                     sizeof(T) * warps * kQueue * kWarp) +
              warp * kQueue * kWarp;
  queue.queued = 0;
  queue.gate = list.key[N - 1];

  const T* pb = p + b * P * 3;
  const T* sb = sigma + b * P * 3;
  const T* Rb = R + b * P * 9;
  for (int start = 0; start < P; start += kTile) {
    const int count = min(kTile, P - start);
    __syncthreads();  // the previous tile is no longer read
    stage_tile(tile, pb, sb, Rb, start, count);
    __syncthreads();
    scan_tile(tile, start, count, qv, active, warp, warps, lane, list, queue);
  }
  queue.merge_into(list, lane);
  merge_warp_lists(smem_raw, warp, warps, lane, active, list);
  if (warp == 0 && active) {
#pragma unroll
    for (int s = 0; s < N; ++s) {
      if (s < K) idx[bq * K + s] = list.ind[s];
    }
  }
}

// K > 32: one thread per query, its sorted list kept in global memory (keys in a scratch
// buffer, indices in the output). Insertion is O(K) with run-time indices; correct, not fast.
template <typename T>
__global__ void knn_search_large_k_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                          const T* __restrict__ sigma, const T* __restrict__ R,
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
    const T k = search_key(pair_distance(qv, p + 3 * pj, sigma + 3 * pj, R + 9 * pj, d, u));
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
// overrides the choice, for tuning; it is read once per process, and the SM counts of the
// devices once per process too: no getenv and no CUDA call per search.
int multiprocessor_count(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<int> sms;
  std::call_once(once, [] {
    std::vector<int> counts(c10::cuda::device_count());
    for (size_t d = 0; d < counts.size(); ++d) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[d], cudaDevAttrMultiProcessorCount,
                                            static_cast<int>(d)));
    }
    sms = std::move(counts);  // only after every query succeeded (a throw lets a later call retry)
  });
  return sms.at(device);
}

int search_warps(int64_t blocks, c10::DeviceIndex device) {
  static const int forced = [] {
    const char* env = std::getenv("NEUSDF_SEARCH_WARPS");
    const int w = env ? std::atoi(env) : 0;
    return w >= 1 && w <= 8 ? w : 0;
  }();
  if (forced) return forced;
  const int sms = multiprocessor_count(device);
  const int64_t target = static_cast<int64_t>(sms) * 32;  // resident warps to aim for
  const int64_t warps = (target + blocks - 1) / blocks;
  return static_cast<int>(std::min<int64_t>(4, std::max<int64_t>(1, warps)));
}

template <typename T, int N>
void launch_search(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                   const at::Tensor& R, const ProblemSize& n, at::Tensor& idx,
                   cudaStream_t stream) {
  const int64_t blocks = n.B * ((n.Q + kWarp - 1) / kWarp);
  const int warps = search_warps(blocks, q.get_device());
  const size_t smem = search_smem_bytes<T, N>(warps);
  knn_search_kernel<T, N><<<blocks, warps * kWarp, smem, stream>>>(
      q.data_ptr<T>(), p.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(), n.Q, n.P, n.K,
      idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_search_large_k(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                           const at::Tensor& R, const ProblemSize& n, at::Tensor& idx,
                           cudaStream_t stream) {
  at::Tensor keys = at::empty({n.B, n.Q, n.K}, q.options());
  const int threads = 128;
  const int64_t blocks = (n.B * n.Q + threads - 1) / threads;
  knn_search_large_k_kernel<T><<<blocks, threads, 0, stream>>>(
      q.data_ptr<T>(), p.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(), n.B * n.Q, n.Q,
      n.P, n.K, keys.data_ptr<T>(), idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor knn_search_cuda(const at::Tensor& q_in, const at::Tensor& p_in,
                           const at::Tensor& sigma_in, const at::Tensor& R_in, int64_t K,
                           c10::string_view method) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const ProblemSize n = check_points(q_in, p_in, sigma_in, R_in, K);
  choose_search_method(method, n, /*cuda=*/true);  // validates method
  TORCH_CHECK(method != "grid", "neusdf: the grid search is not implemented on CUDA yet");
  TORCH_CHECK(n.P < INT_MAX && n.Q < INT_MAX, "neusdf: knn_search supports P, Q < 2^31 on CUDA");
  TORCH_CHECK(n.B * ((n.Q + kWarp - 1) / kWarp) < INT_MAX, "neusdf: B * Q too large");
  at::Tensor idx = at::empty({n.B, n.Q, K}, q_in.options().dtype(at::kLong));
  if (n.B * n.Q == 0) return idx;
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), sigma = sigma_in.contiguous(),
                   R = R_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_search_cuda", [&] {
    using T = scalar_t;
    if (K <= 1) {
      launch_search<T, 1>(q, p, sigma, R, n, idx, stream);
    } else if (K <= 2) {
      launch_search<T, 2>(q, p, sigma, R, n, idx, stream);
    } else if (K <= 4) {
      launch_search<T, 4>(q, p, sigma, R, n, idx, stream);
    } else if (K <= 8) {
      launch_search<T, 8>(q, p, sigma, R, n, idx, stream);
    } else if (K <= 16) {
      launch_search<T, 16>(q, p, sigma, R, n, idx, stream);
    } else if (K <= 32) {
      launch_search<T, 32>(q, p, sigma, R, n, idx, stream);
    } else {
      launch_search_large_k<T>(q, p, sigma, R, n, idx, stream);
    }
  });
  return idx;
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CUDA, m) {
  m.impl("knn_search", &neusdf::knn_search_cuda);
}
