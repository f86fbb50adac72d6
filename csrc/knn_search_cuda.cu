// CUDA kernels of the anisotropic kNN search (contract of knn_search in knn_aggregate.h).
//
// Brute force: a block takes 32 queries of one batch (one per lane) and W warps. The points
// stream through shared memory in tiles; warp w scans points w, w + W, ... of each tile, so all
// lanes of a warp read the same point (a broadcast, no bank conflicts) and each lane keeps the
// N best (key, index) pairs it has seen in registers (N = K rounded up to a power of two, so
// that the list is indexed by compile-time constants only). After each tile the warps publish
// their lists' N-th keys, and every warp drops candidates above the smallest of them (another
// warp already holds N points no worse). At the end the W lists of each query are merged through
// shared memory. No (B, Q, P) tensor ever exists. The Euclidean metric (no sigma, no R) has
// its own instantiation, which stages and reads positions only. K > 32 uses a simple kernel
// that keeps the list in global memory (correct, not fast).
//
// Grid (knn_grid.h; K <= 32): built on the device each call without a host synchronisation
// (the grid's size depends on P only): per-point lam, the batch's (sampled) median lam and box
// (ATen reductions), a counting sort of the points by cell (atomic counts, cumulative sum,
// atomic scatter of packed point records in cell order), each cell's minimum lam. Queries are
// sorted by cell the same way, so that neighbouring threads walk neighbouring cells; each thread
// then runs the ring search of one query with its list in registers.
//
// Tile (knn_grid.h; K <= 32): the points and queries in Morton cell order, a warp of 16 or 8
// queries (2 or 4 lanes each) scanning only the tiles of 32 points that some query's bound does
// not rule out (see "tile search" below).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_pipeline.h>

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"
#include "knn_cuda_helpers.cuh"
#include "knn_grid.h"

namespace neusdf {
namespace {

// One point as the brute force and the grid search read it: position, precisions, axes. The
// padding after the position keeps the parts 16-byte aligned (position and pad are one 16-byte
// load for float); it is written as 0, so that a copied record holds no uninitialised bytes.
// (The tile search reads its points as two arrays, PointPos and PointShape.)
template <typename T>
struct alignas(16) PointRec {
  T p[3];
  T pad;
  T s[3];
  T R[9];
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
// by the per-lane candidate queues, then the lists' bounds the warps publish (two slots per
// lane and warp, written after alternate tiles, so that a slot is never written in the same
// interval between barriers as it is read).
template <typename T, int N>
__host__ __device__ constexpr size_t search_list_bytes() {
  return sizeof(PointRec<T>) * search_tile<T>() > (sizeof(T) + sizeof(int)) * N * kWarp
             ? sizeof(PointRec<T>) * search_tile<T>()
             : (sizeof(T) + sizeof(int)) * N * kWarp;
}

template <typename T>
__host__ __device__ constexpr size_t search_queue_bytes(int warps) {
  return (sizeof(T) + sizeof(int)) * kQueue * kWarp * warps;
}

template <typename T, int N>
size_t search_smem_bytes(int warps) {
  return search_list_bytes<T, N>() + search_queue_bytes<T>(warps) + sizeof(T) * 2 * kWarp * warps;
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

// The bitwise or of v over the warp (whole warp).
__device__ __forceinline__ unsigned warp_or(unsigned v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_or_sync(kFullMask, v);
#else
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v |= __shfl_xor_sync(kFullMask, v, o);
  return v;
#endif
}

// Search keys as unsigned integers of the same order (a larger key, a larger integer), so that
// the warps of a block can lower a shared bound with an integer atomicMin.
__device__ __forceinline__ unsigned int ordered_bits(float k) {
  const unsigned int b = __float_as_uint(k);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ unsigned long long ordered_bits(double k) {
  const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(k));
  return (b >> 63) ? ~b : (b | (1ull << 63));
}
__device__ __forceinline__ float from_ordered_bits(unsigned int o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ __forceinline__ double from_ordered_bits(unsigned long long o) {
  return __longlong_as_double(static_cast<long long>((o >> 63) ? (o & ~(1ull << 63)) : ~o));
}
template <typename T>
using OrderedBits = std::conditional_t<sizeof(T) == 4, unsigned int, unsigned long long>;

// The smallest key a candidate needs to reach to pass the bound b inclusively: k <= b is k < the
// next float above b (search keys are finite, so an infinite b lets everything pass). The value
// of nextafter(b, +inf) without its branches: one step up in the keys' integer order (-0 first
// becomes +0, whose successor is the smallest subnormal).
template <typename T>
__device__ __forceinline__ T next_key_above(T b) {
  return b < static_cast<T>(INFINITY) ? from_ordered_bits(ordered_bits(b + T(0)) + 1) : b;
}

// Candidates that pass the gate wait in a per-lane queue in shared memory; the list is updated
// only when some lane's queue is nearly full, so the warp runs the (divergent) insertion code
// far less often than once a point. Slot s of lane l is at [s * kWarp + l]: the lanes of a warp
// write consecutive words.
//
// The gate is the smaller of two bounds. The lane's own N-th key when the queue was last merged:
// a later point (higher index) needs a strictly smaller key to enter. And one past a bound that
// the query's other lists share (the brute force: the smallest N-th key the block's warps
// published after the previous tile; the tile search: the N-th key of the union of the query's
// lanes' lists): N distinct points lie at or below it, so a point above it is in no query's
// best N, while one equal to it could still win on its index.
//
// kLex: indices arrive in no particular order (the tile search), so "comes before" compares
// (key, index) and a candidate may tie the N-th key.
template <typename T, int N, bool kLex = false>
struct LaneQueue {
  T* key;
  int* ind;
  int queued;
  T own;    // the list's N-th key at the last merge
  T block;  // one past the bound the query's other lists share (-inf: an inactive lane)
  T gate;   // min(own, block): a candidate enters when its key is below it

  __device__ __forceinline__ void set_block_bound(T b) {
    block = b;
    gate = min(own, block);
  }

  __device__ __forceinline__ void push(T k, int j, int lane) {
    key[queued * kWarp + lane] = k;
    ind[queued * kWarp + lane] = j;
    ++queued;
  }

  // Inserts the queued candidates into the list, empties the queue and raises the gate. Without
  // kLex the candidates' indices exceed every index in the list, so "comes before" is "smaller
  // key".
  __device__ __forceinline__ void merge_into(LaneList<T, N>& list, int lane) {
    // The tile search's kernel is large enough that fetching instructions stalls it, so there
    // the slots share one copy of the insertion (kLex), in a loop over the queued slots only
    // (over all kQueue with a predicate it was 3-6% slower); the brute force's keeps kQueue.
#pragma unroll(kLex ? 1 : kQueue)
    for (int s = 0; s < (kLex ? queued : kQueue); ++s) {
      if (kLex || s < queued) {
        const T k = key[s * kWarp + lane];
        const int j = ind[s * kWarp + lane];
        if (kLex ? comes_before<T>(k, j, list.key[N - 1], list.ind[N - 1]) : k < list.key[N - 1]) {
          insert_sorted<T, N, kLex>(list.key, list.ind, k, j);
        }
      }
    }
    queued = 0;
    own = kLex ? next_key_above(list.key[N - 1]) : list.key[N - 1];
    gate = min(own, block);
  }
};

// Copies points [start, start + count) of one batch into the shared tile (whole block) and
// fills the rest of the tile with NaN records. A NaN record's key is the largest finite value
// (search_key) and its index is past every point's, so it comes after every real point in the
// search's order: it can enter a list only while fewer than N real points are in it, and the
// first K <= P entries of the merged list are never NaN records. So the scan needs no bounds
// check.
// kEuclidean: positions only (sb and Rb are not read).
template <typename T, bool kEuclidean>
__device__ __forceinline__ void stage_tile(PointRec<T>* tile, const T* __restrict__ pb,
                                           const T* __restrict__ sb, const T* __restrict__ Rb,
                                           int start, int count) {
  for (int t = threadIdx.x; t < search_tile<T>(); t += blockDim.x) {
    const int64_t j = start + t;
    const bool real = t < count;
    if (kEuclidean) {
#pragma unroll
      for (int c = 0; c < 3; ++c) tile[t].p[c] = real ? pb[3 * j + c] : static_cast<T>(NAN);
      continue;
    }
    PointRec<T> rec;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      rec.p[c] = real ? pb[3 * j + c] : static_cast<T>(NAN);
      rec.s[c] = real ? sb[3 * j + c] : static_cast<T>(1);
    }
#pragma unroll
    for (int c = 0; c < 9; ++c) rec.R[c] = real ? Rb[9 * j + c] : static_cast<T>(0);
    rec.pad = 0;
    tile[t] = rec;
  }
}

// Scans this warp's share of a staged tile (points warp, warp + warps, ...) for the lane's
// query: kUnroll points per step (independent distance chains for ILP) and one warp vote per
// step. warps is a power of two <= 8, so every step's points lie in the tile (no bounds check)
// and the loop bounds are uniform across the warp (the vote is safe).
template <typename T, int N, bool kEuclidean>
__device__ __forceinline__ void scan_tile(const PointRec<T>* tile, int start, const T qv[3],
                                          int warp, int warps, int lane, LaneList<T, N>& list,
                                          LaneQueue<T, N>& queue) {
  static_assert(search_tile<T>() % (kUnroll * 8) == 0, "a tile is a whole number of steps");
  for (int t0 = warp; t0 < search_tile<T>(); t0 += kUnroll * warps) {
    T k[kUnroll];
#pragma unroll
    for (int x = 0; x < kUnroll; ++x) {
      const PointRec<T>& r = tile[t0 + x * warps];
      if (kEuclidean) {
        k[x] = search_key(euclidean_distance(qv, r.p));
      } else {
        T d[3], u[3];
        k[x] = search_key(pair_distance(qv, r.p, r.s, r.R, d, u));
      }
    }
#pragma unroll
    for (int x = 0; x < kUnroll; ++x) {
      if (k[x] < queue.gate) queue.push(k[x], start + t0 + x * warps, lane);
    }
    if (__any_sync(kFullMask, queue.queued > kQueue - kUnroll)) queue.merge_into(list, lane);
  }
}

// Puts the one of entries a and b that comes first in (key, index) order at a, the other at b
// (selects, no branch; a and b compile-time after unrolling, so the arrays stay in registers).
template <typename T, int N>
__device__ __forceinline__ void compare_exchange(T (&key)[N], int (&ind)[N], int a, int b) {
  const bool swap = comes_before<T>(key[b], ind[b], key[a], ind[a]);
  const T k = key[a];
  const int x = ind[a];
  key[a] = swap ? key[b] : k;
  ind[a] = swap ? ind[b] : x;
  key[b] = swap ? k : key[b];
  ind[b] = swap ? x : ind[b];
}

// Sorts a bitonic sequence of N (key, index) pairs into ascending (key, index) order (Batcher's
// bitonic merge: log2 N rounds of N / 2 compare-exchanges, compile-time indices only).
template <typename T, int N>
__device__ __forceinline__ void sort_bitonic(T (&key)[N], int (&ind)[N]) {
#pragma unroll
  for (int j = N / 2; j > 0; j /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if ((i & j) == 0) compare_exchange(key, ind, i, i + j);
    }
  }
}

// Sorts entries [0, C) of (key, ind) into ascending (key, index) order (Batcher's bitonic sort:
// C a power of two <= N; compile-time indices only, no branches on the data).
template <typename T, int C, int N>
__device__ __forceinline__ void sort_prefix(T (&key)[N], int (&ind)[N]) {
  static_assert(C <= N && (C & (C - 1)) == 0, "C is a power of two <= N");
#pragma unroll
  for (int k = 2; k <= C; k *= 2) {
#pragma unroll
    for (int j = k / 2; j > 0; j /= 2) {
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int l = i ^ j;
        if (l > i) {
          // this run ascends (the first at i), then the next descends (the first at l)
          if ((i & k) == 0) {
            compare_exchange(key, ind, i, l);
          } else {
            compare_exchange(key, ind, l, i);
          }
        }
      }
    }
  }
}

// The N first of the union of list and another ascending list of N (key, index) pairs, into
// list. Of two sorted lists a and b, the N first of their union are min(a_s, b_(N-1-s)) over s,
// a bitonic sequence (Batcher's half-cleaner), which sort_bitonic then orders: no
// data-dependent branches. The two lists must not share a point.
template <typename T, int N>
__device__ __forceinline__ void merge_sorted_lists(LaneList<T, N>& list, const T (&key)[N],
                                                   const int (&ind)[N]) {
#pragma unroll
  for (int s = 0; s < N; ++s) {
    if (comes_before<T>(key[N - 1 - s], ind[N - 1 - s], list.key[s], list.ind[s])) {
      list.key[s] = key[N - 1 - s];
      list.ind[s] = ind[N - 1 - s];
    }
  }
  sort_bitonic(list.key, list.ind);
}

// Merges the other warps' lists into warp 0's, one warp at a time, through shared memory
// (buf: N * kWarp keys, then N * kWarp indices; merge_sorted_lists). Whole block.
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
      T k[N];
      int j[N];
#pragma unroll
      for (int s = 0; s < N; ++s) {
        k[s] = buf_key[s * kWarp + lane];
        j[s] = buf_ind[s * kWarp + lane];
      }
      merge_sorted_lists(list, k, j);
    }
  }
}

template <typename T, int N, bool kEuclidean>
__global__ void knn_search_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                  const T* __restrict__ sigma, const T* __restrict__ R, int Q,
                                  int P, int K, int64_t* __restrict__ idx,
                                  int64_t* __restrict__ query_order) {
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
  queue.own = list.key[N - 1];
  // an inactive lane never queues (its list is never read)
  queue.set_block_bound(active ? static_cast<T>(INFINITY) : -static_cast<T>(INFINITY));
  // published[slot][warp][lane]: the N-th key of warp's list for query lane after a tile
  T* published = reinterpret_cast<T*>(smem_raw + search_list_bytes<T, N>() +
                                      search_queue_bytes<T>(warps));

  const T* pb = p + b * P * 3;
  const T* sb = sigma + b * P * 3;
  const T* Rb = R + b * P * 9;
  for (int start = 0, tile_no = 0; start < P; start += kTile, ++tile_no) {
    const int count = min(kTile, P - start);
    __syncthreads();  // the previous tile is no longer read
    stage_tile<T, kEuclidean>(tile, pb, sb, Rb, start, count);
    __syncthreads();
    if (tile_no > 0 && active) {
      const T* slot = published + ((tile_no - 1) & 1) * warps * kWarp;
      T smallest = slot[lane];
      for (int w = 1; w < warps; ++w) smallest = min(smallest, slot[w * kWarp + lane]);
      queue.set_block_bound(next_key_above(smallest));
    }
    scan_tile<T, N, kEuclidean>(tile, start, qv, warp, warps, lane, list, queue);
    published[(tile_no & 1) * warps * kWarp + warp * kWarp + lane] = list.key[N - 1];
  }
  queue.merge_into(list, lane);
  merge_warp_lists(smem_raw, warp, warps, lane, active, list);
  if (warp == 0 && active) {
#pragma unroll
    for (int s = 0; s < N; ++s) {
      if (s < K) idx[bq * K + s] = list.ind[s];
    }
    if (query_order != nullptr) query_order[bq] = bq;  // brute force keeps the given order
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

// The largest power of two <= w (w >= 1): the scan needs warps to divide a tile's steps.
int power_of_two_floor(int64_t w) {
  int p = 1;
  while (2 * p <= w) p *= 2;
  return p;
}

// Warps per search block: enough blocks x warps to fill the GPU, at most 4 (on an H100, 4 beat
// 2, 6 and 8 at P = 4096 and P = 65536: benchmarks/RESULTS.md), a power of two (the scan's
// steps must divide a tile). NEUSDF_SEARCH_WARPS (1..8, rounded down to a power of two)
// overrides the choice, for tuning; it is read once per process, and the SM counts of the
// devices once per process too: no getenv and no CUDA call per search.
int search_warps(int64_t blocks, c10::DeviceIndex device) {
  static const int forced = [] {
    const char* env = std::getenv("NEUSDF_SEARCH_WARPS");
    const int w = env ? std::atoi(env) : 0;
    return w >= 1 && w <= 8 ? power_of_two_floor(w) : 0;
  }();
  if (forced) return forced;
  const int sms = device_facts(device).multiprocessors;
  const int64_t target = static_cast<int64_t>(sms) * 32;  // resident warps to aim for
  const int64_t warps = (target + blocks - 1) / blocks;
  return power_of_two_floor(std::min<int64_t>(4, std::max<int64_t>(1, warps)));
}

// Brute force; sigma and R undefined: the Euclidean metric.
template <typename T, int N>
void launch_search(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                   const at::Tensor& R, const ProblemSize& n, at::Tensor& idx,
                   int64_t* query_order, cudaStream_t stream) {
  const int64_t blocks = n.B * ((n.Q + kWarp - 1) / kWarp);
  const int warps = search_warps(blocks, q.get_device());
  const size_t smem = search_smem_bytes<T, N>(warps);
  const auto kernel =
      sigma.defined() ? knn_search_kernel<T, N, false> : knn_search_kernel<T, N, true>;
  kernel<<<blocks, warps * kWarp, smem, stream>>>(q.data_ptr<T>(), p.data_ptr<T>(),
                                                  data_or_null<T>(sigma), data_or_null<T>(R),
                                                  n.Q, n.P, n.K, idx.data_ptr<int64_t>(),
                                                  query_order);
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

// ------------------------------------------------------------------------------ grid search

constexpr int kGridThreads = 128;

// About this many points per grid cell on the GPU (the CPU uses 2): a thread that visits a
// cell waits on three dependent loads (its bucket offsets and minimum lam) before it can
// prune it, so fewer, fuller cells win. Measured on an H100 (benchmarks/RESULTS.md), search
// ms at 2 / 4 / 8 / 16 / 32 points per cell: P = 65536 1.35 / 1.18 / 1.07 / 1.04 / 1.08,
// P = 1M 10.6 / 9.7 / 9.6 / 9.4 / 9.1, P = 4096 0.73 / 0.67 / 0.62 / 0.70 / 4.08.
constexpr int kGridPointsPerCellCuda = 8;

int64_t grid_blocks(int64_t n) { return (n + kGridThreads - 1) / kGridThreads; }

// The buffers of one call carved out of a single allocation: reserve() each size, allocate()
// once, ptr() each buffer. Offsets are multiples of 256 bytes (the alignment cudaMalloc gives,
// which the 16-byte records need).
class Workspace {
 public:
  size_t reserve(size_t bytes) {
    const size_t offset = size_;
    size_ += (bytes + 255) / 256 * 256;
    return offset;
  }
  at::Tensor allocate(const at::TensorOptions& opts) const {
    return at::empty({static_cast<int64_t>(std::max<size_t>(size_, 1))}, opts.dtype(at::kByte));
  }
  template <typename U>
  static U* ptr(const at::Tensor& buffer, size_t offset) {
    return reinterpret_cast<U*>(static_cast<unsigned char*>(buffer.data_ptr()) + offset);
  }

 private:
  size_t size_ = 0;
};

template <typename T>
__global__ void point_lambda_kernel(const T* __restrict__ p, const T* __restrict__ sigma,
                                    const T* __restrict__ R, int64_t BP, T* __restrict__ lam) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= BP) return;
  lam[x] = point_lambda(p + 3 * x, sigma + 3 * x, R + 9 * x);
}

// Bucket of every point (in_cells given: its cell, else bucket G^3) or query (in_cells null:
// its clamped cell when finite, else bucket G^3), counted into counts[b * buckets + bucket].
template <typename T>
__global__ void bucket_kernel(const T* __restrict__ xyz, const bool* __restrict__ in_cells,
                              const T* __restrict__ lo, const T* __restrict__ hi, int64_t n,
                              int64_t per_batch, int G, int* __restrict__ bucket,
                              int* __restrict__ counts) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= n) return;
  const int64_t b = x / per_batch;
  const GridGeom<T> g = make_grid_geom(lo + 3 * b, hi + 3 * b, G);
  const int cells = G * G * G;
  const T* v = xyz + 3 * x;
  const bool inside =
      in_cells ? in_cells[x] : (is_finite(v[0]) && is_finite(v[1]) && is_finite(v[2]));
  int bk = cells;
  if (inside) {
    const int c[3] = {cell_coord(v[0], g, 0), cell_coord(v[1], g, 1), cell_coord(v[2], g, 2)};
    bk = static_cast<int>(cell_linear(c, G));
  }
  bucket[x] = bk;
  atomicAdd(counts + b * (cells + 1) + bk, 1);
}

// The record of point x (a flat index over all batches).
template <typename T>
__device__ __forceinline__ PointRec<T> point_record(const T* __restrict__ p,
                                                    const T* __restrict__ sigma,
                                                    const T* __restrict__ R, int64_t x) {
  PointRec<T> rec;
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    rec.p[c] = p[3 * x + c];
    rec.s[c] = sigma[3 * x + c];
  }
#pragma unroll
  for (int c = 0; c < 9; ++c) rec.R[c] = R[9 * x + c];
  rec.pad = 0;
  return rec;
}

// Counting sort's scatter: slot of element x = the next free place of its bucket. With records
// (points), also copies the point's record into its slot. order holds the index within the batch
// (points) or the flat index (queries, flat = true).
template <typename T>
__global__ void scatter_kernel(const int* __restrict__ bucket, int64_t n, int64_t per_batch,
                               int buckets, bool flat, int* __restrict__ cursor,
                               int* __restrict__ order, const T* __restrict__ p,
                               const T* __restrict__ sigma, const T* __restrict__ R,
                               PointRec<T>* __restrict__ records) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= n) return;
  const int64_t b = x / per_batch;
  const int slot = atomicAdd(cursor + b * buckets + bucket[x], 1);
  order[slot] = flat ? static_cast<int>(x) : static_cast<int>(x - b * per_batch);
  if (records != nullptr) records[slot] = point_record(p, sigma, R, x);
}

// Minimum lam over each cell's points (+inf for an empty cell); cells of all batches.
template <typename T>
__global__ void cell_lambda_kernel(const int* __restrict__ start, const int* __restrict__ order,
                                   const T* __restrict__ lam, int64_t B, int cells, int64_t P,
                                   T* __restrict__ cell_lam) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= B * cells) return;
  const int64_t b = x / cells, bucket = b * (cells + 1) + x % cells;
  T m = INFINITY;
  for (int s = start[bucket]; s < start[bucket + 1]; ++s) {
    const T l = lam[b * P + order[s]];
    m = l < m ? l : m;
  }
  cell_lam[x] = m;
}

// The device side of the grid of every batch.
template <typename T>
struct GridView {
  const T* lo;            // (B, 3) bounding box of the points in cells
  const T* hi;            // (B, 3)
  const int* start;       // B * (G^3 + 1) + 1 bucket offsets into order / records
  const int* order;       // point index within the batch, slot by slot
  const PointRec<T>* records;  // point records, slot by slot
  const T* cell_lam;      // (B, G^3) minimum lam of each cell
  const T* lam_min;       // (B,) minimum lam over the batch's points in cells
  int G;
};

template <typename T, int N>
__device__ __forceinline__ void scan_slots(const GridView<T>& grid, int begin, int end,
                                           const T qv[3], LaneList<T, N>& list) {
  for (int slot = begin; slot < end; ++slot) {
    const PointRec<T>& r = grid.records[slot];
    T d[3], u[3];
    const T k = search_key(pair_distance(qv, r.p, r.s, r.R, d, u));
    const int j = grid.order[slot];
    if (comes_before<T>(k, j, list.key[N - 1], list.ind[N - 1])) {
      insert_sorted<T, N, true>(list.key, list.ind, k, j);
    }
  }
}

// One thread per query, in cell order (qorder). The list holds N >= K entries; pruning
// against its N-th key (>= the K-th) is conservative.
template <typename T, int N>
__global__ void knn_grid_search_kernel(const T* __restrict__ q, const int* __restrict__ qorder,
                                       GridView<T> grid, int64_t BQ, int Q, int K,
                                       int64_t* __restrict__ idx) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= BQ) return;
  const int64_t bq = qorder[x];
  const int64_t b = bq / Q;
  const int G = grid.G, cells = G * G * G;
  const int* start = grid.start + b * (cells + 1);
  const T qv[3] = {q[3 * bq], q[3 * bq + 1], q[3 * bq + 2]};
  LaneList<T, N> list;
  list.clear();
  scan_slots(grid, start[cells], start[cells + 1], qv, list);  // points outside the bound
  if (!(is_finite(qv[0]) && is_finite(qv[1]) && is_finite(qv[2]))) {
    scan_slots(grid, start[0], start[cells], qv, list);  // no bound holds: every cell
  } else {
    const GridGeom<T> g = make_grid_geom(grid.lo + 3 * b, grid.hi + 3 * b, G);
    const T lam_min = grid.lam_min[b];
    const T* cell_lam = grid.cell_lam + b * cells;
    const int cq[3] = {cell_coord(qv[0], g, 0), cell_coord(qv[1], g, 1),
                       cell_coord(qv[2], g, 2)};
    int rmax = 0;
    for (int a = 0; a < 3; ++a) rmax = max(rmax, max(cq[a], G - 1 - cq[a]));
    for (int r = 0; r <= rmax; ++r) {
      if (r > 0) {
        const T gap2 = ring_gap2(qv, g, cq, r);
        if (gap2 < T(0) || bound_key(lam_min, gap2) > list.key[N - 1]) break;
      }
      // The cells at Chebyshev distance exactly r from cq, clipped to the grid.
      for (int z = max(0, cq[2] - r); z <= min(G - 1, cq[2] + r); ++z) {
        for (int y = max(0, cq[1] - r); y <= min(G - 1, cq[1] + r); ++y) {
          const bool shell = abs(z - cq[2]) == r || abs(y - cq[1]) == r;
          const int step = shell || r == 0 ? 1 : 2 * r;
          for (int xc = cq[0] - r; xc <= cq[0] + r; xc += step) {
            if (xc < 0 || xc >= G) continue;
            const int c[3] = {xc, y, z};
            const int64_t cell = cell_linear(c, G);
            if (start[cell] == start[cell + 1]) continue;
            if (bound_key(cell_lam[cell], cell_gap2(qv, g, c)) > list.key[N - 1]) continue;
            scan_slots(grid, start[cell], start[cell + 1], qv, list);
          }
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < N; ++s) {
    if (s < K) idx[bq * K + s] = list.ind[s];
  }
}

// Counting sort of n elements (per_batch of them per batch) into B * buckets buckets: returns
// (start: B * buckets + 1 offsets, order), bucket[x] given, counts accumulated by bucket_kernel.
template <typename T>
std::pair<at::Tensor, at::Tensor> counting_sort(const at::Tensor& bucket, const at::Tensor& counts,
                                                int64_t per_batch, int buckets, bool flat,
                                                const T* p, const T* sigma, const T* R,
                                                PointRec<T>* records, cudaStream_t stream) {
  const int64_t n = bucket.numel();
  at::Tensor start = at::zeros({counts.numel() + 1}, counts.options());
  start.narrow(0, 1, counts.numel()).copy_(at::cumsum(counts, 0, at::kInt));
  at::Tensor cursor = start.narrow(0, 0, counts.numel()).clone();
  at::Tensor order = at::empty({n}, counts.options());
  scatter_kernel<T><<<grid_blocks(n), kGridThreads, 0, stream>>>(
      bucket.data_ptr<int>(), n, per_batch, buckets, flat, cursor.data_ptr<int>(),
      order.data_ptr<int>(), p, sigma, R, records);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {start, order};
}

template <typename T, int N>
void launch_grid_search(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                        const at::Tensor& R, const ProblemSize& n, at::Tensor& idx,
                        int64_t* query_order, cudaStream_t stream) {
  const int G = grid_cells_per_axis(n.P, kGridPointsPerCellCuda);
  const int cells = G * G * G, buckets = cells + 1;
  TORCH_CHECK(n.B * n.P < INT_MAX && n.B * n.Q < INT_MAX && n.B * buckets < INT_MAX,
              "neusdf: the CUDA grid search supports B * P, B * Q and B * cells < 2^31");
  const auto opts = q.options();
  const auto iopts = opts.dtype(at::kInt);
  // Per-point bound; points below a fraction of the batch median (or without a bound) go to
  // the bucket every query scans.
  at::Tensor lam = at::empty({n.B, n.P}, opts);
  point_lambda_kernel<T><<<grid_blocks(n.B * n.P), kGridThreads, 0, stream>>>(
      p.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(), n.B * n.P, lam.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the upper median of a sample (knn_grid.h): kthvalue is 1-based, sorted[n / 2] is n / 2 + 1
  const at::Tensor sample = lam.slice(1, 0, n.P, lam_sample_stride(n.P));
  const at::Tensor median = std::get<0>(at::kthvalue(sample, sample.size(1) / 2 + 1, 1));
  const at::Tensor floor = median.clamp_min(0).mul(kLamFloorOfMedian).unsqueeze(1);
  const at::Tensor in_cells = lam.gt(0).logical_and_(lam.ge(floor)).contiguous();
  const at::Tensor out = in_cells.logical_not().unsqueeze(2);
  const at::Tensor lo = p.masked_fill(out, INFINITY).amin(1).contiguous();
  const at::Tensor hi = p.masked_fill(out, -INFINITY).amax(1).contiguous();
  // Points: bucket, counting sort, packed records in slot order, per-cell minimum lam.
  at::Tensor counts = at::zeros({n.B * buckets}, iopts);
  at::Tensor bucket = at::empty({n.B * n.P}, iopts);
  bucket_kernel<T><<<grid_blocks(n.B * n.P), kGridThreads, 0, stream>>>(
      p.data_ptr<T>(), in_cells.data_ptr<bool>(), lo.data_ptr<T>(), hi.data_ptr<T>(),
      n.B * n.P, n.P, G, bucket.data_ptr<int>(), counts.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor records =
      at::empty({n.B * n.P * static_cast<int64_t>(sizeof(PointRec<T>))}, opts.dtype(at::kByte));
  PointRec<T>* rec = reinterpret_cast<PointRec<T>*>(records.data_ptr());
  const std::pair<at::Tensor, at::Tensor> sorted =
      counting_sort<T>(bucket, counts, n.P, buckets, false, p.data_ptr<T>(),
                       sigma.data_ptr<T>(), R.data_ptr<T>(), rec, stream);
  const at::Tensor& start = sorted.first;  // B * buckets + 1 slot offsets
  const at::Tensor& order = sorted.second;  // point index within the batch, per slot
  at::Tensor cell_lam = at::empty({n.B, cells}, opts);
  cell_lambda_kernel<T><<<grid_blocks(n.B * cells), kGridThreads, 0, stream>>>(
      start.data_ptr<int>(), order.data_ptr<int>(), lam.data_ptr<T>(), n.B, cells, n.P,
      cell_lam.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor lam_min = cell_lam.amin(1).contiguous();
  // Queries: sorted by cell too, so that a warp's threads walk nearby cells.
  at::Tensor qcounts = at::zeros({n.B * buckets}, iopts);
  at::Tensor qbucket = at::empty({n.B * n.Q}, iopts);
  bucket_kernel<T><<<grid_blocks(n.B * n.Q), kGridThreads, 0, stream>>>(
      q.data_ptr<T>(), nullptr, lo.data_ptr<T>(), hi.data_ptr<T>(), n.B * n.Q, n.Q, G,
      qbucket.data_ptr<int>(), qcounts.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor qorder = counting_sort<T>(qbucket, qcounts, n.Q, buckets, true, nullptr,
                                             nullptr, nullptr, nullptr, stream)
                                .second;
  const GridView<T> view{lo.data_ptr<T>(),      hi.data_ptr<T>(),       start.data_ptr<int>(),
                         order.data_ptr<int>(), rec,                    cell_lam.data_ptr<T>(),
                         lam_min.data_ptr<T>(), G};
  knn_grid_search_kernel<T, N><<<grid_blocks(n.B * n.Q), kGridThreads, 0, stream>>>(
      q.data_ptr<T>(), qorder.data_ptr<int>(), view, n.B * n.Q, static_cast<int>(n.Q),
      static_cast<int>(n.K), idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (query_order != nullptr) {  // the queries' cell order, widened to int64
    at::from_blob(query_order, {n.B * n.Q}, q.options().dtype(at::kLong)).copy_(qorder);
  }
}

// ------------------------------------------------------------------------------ tile search
//
// Method "tile" (knn_grid.h, "tiles"; docs/op.md, "The tile search"), built each call without
// a host synchronisation, in one cooperative kernel (tile_build_kernel): the points' Morton box
// per batch, a counting sort of the points and the queries by Morton cell (counts with each
// entry's rank in its cell, their exclusive sum, a scatter), then one warp per tile of 32 points
// gathers the tile's positions and shapes in that order and reduces its bounding box and
// smallest lam, and one warp per chunk of 32 tiles the union of their boxes. The search kernel
// gives a warp 16 or 8 queries consecutive in that order, 2 or 4 lanes each (below, "tile
// search, L lanes a query").
//
// The order inside a cell is the atomics' order, so it varies between calls; the search is
// exact, so only its speed could depend on it, and a cell holds one to eight points or queries
// of the larger kind (tile_cell_bits). A radix sort of full Morton keys (CUB's onesweep) made 12
// of the call's 18 CUDA runtime calls, which the host took longer to launch than the GPU to run
// (docs/op.md, "Lanes a query, and a call's launches").

// A point's two parts as the tile search reads them, in two arrays in the tiles' order: the
// position and the prefilter's weight (read for every point of a scanned tile) and the
// precisions and axes (read only for the points under some lane's prefilter bound: about a
// tenth to a fifth of them). A scanned tile's 32 of each are contiguous (512 and 1536 bytes for
// float), and both are copied to shared memory while the previous tile is scanned.
template <typename T>
struct alignas(16) PointPos {
  T p[3];
  T w;
};
template <typename T>
struct alignas(16) PointShape {
  T s[3];
  T R[9];
};

// The build runs as one cooperative kernel (all its blocks resident, grid-wide barriers between
// its phases): a call's build is then one CUDA runtime call instead of eight (a memset, the box,
// the counts, CUB's two scan kernels, the scatter, the tiles, the chunks), which the host took
// longer to launch than the GPU to run. Measured (docs/op.md, "The build in one launch, and
// the chunks' order"): a raw call 0.01-0.04 ms faster, the GPU's time 0-4% longer (the
// barriers).
constexpr int kBuildThreads = 256;
constexpr int kBuildItems = 8;          // counters a thread scans per step
constexpr int kBoxPoints = 8 * kWarp;  // points a warp reduces into a batch's box per step

// Buffers and sizes of one build. The sort's segments are each batch's points (segment b), then
// each batch's queries (B + b), so that the counts' exclusive sum over all segments is every
// slot's place in one array of B (P + Q) entries (points x < B P, queries after, as in the
// inputs); counts[segment << 3 cell_bits | cell].
template <typename T>
struct TileBuild {
  const T* p;
  const T* q;
  const T* sigma;
  const T* R;
  int64_t B, P, Q;
  int cell_bits, tiles, chunks;
  int64_t counters;                 // 2 B << 3 cell_bits
  OrderedBits<T>* box_bits;         // 6 a batch (tile_morton_box_of)
  int* counts;                      // counters
  int* start;                       // counters: exclusive sums of counts
  int* block_sums;                  // gridDim.x: each block's sum of its range of counts
  unsigned* cells_in;               // B (P + Q): each point's and query's cell
  int* rank;                        // B (P + Q): its rank among its cell's entries
  unsigned* cells;                  // B (P + Q) in slot order (ascending within a segment)
  int* sorted;                      // B (P + Q): the point or query x in each slot
  PointPos<T>* positions;           // B P, slot order
  PointShape<T>* shapes;            // B P, slot order
  int* order;                       // B P, slot order: the point's index in its batch
  TileBox<T>* boxes;                // B tiles
  TileBox<T>* chunk_boxes;          // B chunks
  int* handoff_state;               // handoff_state_ints: TileHandoff's counters and flags
  int64_t handoff_state_ints;
};

// Morton box of batch b, points [first, first + kBoxPoints): the finite points' smallest and
// largest coordinates, kept as the complements of the ordered bits of lo and of -hi (so that one
// atomicMax serves both, on a buffer that starts all zero: an untouched slot decodes to NaN, and
// a batch without a finite point orders every point as cell 0). Whole warp.
template <typename T>
__device__ void tile_morton_box_of(const TileBuild<T>& a, int64_t b, int64_t first, int lane) {
  T m[6];
#pragma unroll
  for (int c = 0; c < 6; ++c) m[c] = static_cast<T>(INFINITY);
  for (int64_t j = first + lane; j < min(first + kBoxPoints, a.P); j += kWarp) {
    const T* x = a.p + 3 * (b * a.P + j);
    if (!(is_finite(x[0]) && is_finite(x[1]) && is_finite(x[2]))) continue;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      m[c] = min(m[c], x[c]);
      m[3 + c] = min(m[3 + c], -x[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < 6; ++c) {
    for (int o = kWarp / 2; o > 0; o >>= 1) m[c] = min(m[c], __shfl_xor_sync(kFullMask, m[c], o));
  }
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < 6; ++c) atomicMax(a.box_bits + 6 * b + c, ~ordered_bits(m[c]));
  }
}

// The sort segment of point or query x (TileBuild): b for a point of batch b, B + b for a query.
__device__ __forceinline__ int64_t tile_segment(int64_t x, int64_t B, int64_t P, int64_t Q) {
  return x < B * P ? x / P : B + (x - B * P) / Q;
}

// The Morton cell (3 cell_bits bits: the top bits of morton_code) of point or query x, counted
// into its segment's counts, and x's rank among that cell's entries.
template <typename T>
__device__ void tile_count_cell(const TileBuild<T>& a, int64_t x) {
  const int64_t b = x < a.B * a.P ? x / a.P : (x - a.B * a.P) / a.Q;
  const T* xyz = x < a.B * a.P ? a.p + 3 * x : a.q + 3 * (x - a.B * a.P);
  T lo[3], hi[3];
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    lo[c] = from_ordered_bits(~a.box_bits[6 * b + c]);
    hi[c] = -from_ordered_bits(~a.box_bits[6 * b + 3 + c]);
  }
  const auto cell =
      static_cast<unsigned>(morton_code(xyz, lo, hi) >> (3 * (kMortonBits - a.cell_bits)));
  a.cells_in[x] = cell;
  a.rank[x] = atomicAdd(a.counts + (tile_segment(x, a.B, a.P, a.Q) << (3 * a.cell_bits)) + cell, 1);
}

// Every lane's box becomes the union of the warp's boxes (union_tile_box). Whole warp.
template <typename T>
__device__ __forceinline__ void warp_union_box(TileBox<T>& box) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    TileBox<T> other;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      other.lo[a] = __shfl_xor_sync(kFullMask, box.lo[a], o);
      other.hi[a] = __shfl_xor_sync(kFullMask, box.hi[a], o);
    }
    other.lam = __shfl_xor_sync(kFullMask, box.lam, o);
    union_tile_box(box, other);
  }
}

// Tile t of batch b: its positions, shapes and indices in slot order (slot s of batch b holds
// the point sorted[b P + s]), and its box and smallest lam (extend_tile_box's rules). Whole warp.
template <typename T>
__device__ void tile_build_one(const TileBuild<T>& a, int64_t b, int t, int lane) {
  const int s = t * kTilePoints + lane;
  TileBox<T> box = empty_tile_box<T>();
  if (s < a.P) {
    const int64_t slot = b * a.P + s;
    const int64_t x = a.sorted[slot];  // the flat index b P + j of the point
    const PointRec<T> rec = point_record(a.p, a.sigma, a.R, x);
    const T lam = point_lambda(rec.p, rec.s, rec.R);
    PointPos<T> pos;
    PointShape<T> shape;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      pos.p[c] = rec.p[c];
      shape.s[c] = rec.s[c];
    }
#pragma unroll
    for (int c = 0; c < 9; ++c) shape.R[c] = rec.R[c];
    pos.w = point_bound_weight(lam);  // read only in tiles whose smallest lam is > 0
    a.positions[slot] = pos;
    a.shapes[slot] = shape;
    a.order[slot] = static_cast<int>(x - b * a.P);
    extend_tile_box(box, rec.p, lam);
  }
  warp_union_box(box);
  if (lane == 0) a.boxes[b * a.tiles + t] = box;
}

// The tile search's build (TileBuild), one cooperative launch, grid-wide barriers between the
// phases: zero the box, the counts and the hand-off state (TileHandoff); each batch's Morton
// box; count every point and query into its cell; the exclusive sum of the counts (each block
// sums a contiguous range, then scans it after the sums of the blocks before it); scatter every
// entry to its slot; one warp per tile (tile_build_one); one warp per chunk of 32 tiles, the
// union of their boxes, which the search tests before the tiles' own.
template <typename T>
__global__ void __launch_bounds__(kBuildThreads) tile_build_kernel(const TileBuild<T> a) {
  namespace cg = cooperative_groups;
  const cg::grid_group grid = cg::this_grid();
  using Scan = cub::BlockScan<int, kBuildThreads>;
  using Reduce = cub::BlockReduce<int, kBuildThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  const int lane = threadIdx.x % kWarp;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(kBuildThreads) + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kBuildThreads;
  const int64_t warp = thread / kWarp, warps = threads / kWarp;
  const int64_t total = a.B * (a.P + a.Q);

  for (int64_t i = thread; i < a.counters; i += threads) a.counts[i] = 0;
  for (int64_t i = thread; i < 6 * a.B; i += threads) a.box_bits[i] = 0;
  for (int64_t i = thread; i < a.handoff_state_ints; i += threads) a.handoff_state[i] = 0;
  grid.sync();
  const int64_t box_steps = (a.P + kBoxPoints - 1) / kBoxPoints;
  for (int64_t i = warp; i < a.B * box_steps; i += warps) {
    tile_morton_box_of(a, i / box_steps, i % box_steps * kBoxPoints, lane);
  }
  grid.sync();
  for (int64_t x = thread; x < total; x += threads) tile_count_cell(a, x);
  grid.sync();
  // the exclusive sum: block k takes counters [k per, (k + 1) per)
  const int64_t per = (a.counters + gridDim.x - 1) / gridDim.x;
  const int64_t lo = min(a.counters, blockIdx.x * per), hi = min(a.counters, lo + per);
  int sum = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kBuildThreads) sum += a.counts[i];
  sum = Reduce(temp.reduce).Sum(sum);
  if (threadIdx.x == 0) a.block_sums[blockIdx.x] = sum;
  grid.sync();
  __shared__ int block_carry;  // the sum of the counts before this block's range
  int carry = 0;
  for (int k = threadIdx.x; k < static_cast<int>(blockIdx.x); k += kBuildThreads) {
    carry += a.block_sums[k];
  }
  __syncthreads();  // temp.reduce is reused
  carry = Reduce(temp.reduce).Sum(carry);
  if (threadIdx.x == 0) block_carry = carry;
  __syncthreads();
  carry = block_carry;
  for (int64_t base = lo; base < hi; base += kBuildThreads * kBuildItems) {
    int v[kBuildItems];
    const int64_t mine = base + threadIdx.x * kBuildItems;  // blocked: consecutive counters
#pragma unroll
    for (int i = 0; i < kBuildItems; ++i) v[i] = mine + i < hi ? a.counts[mine + i] : 0;
    int step_total = 0;
    __syncthreads();  // temp.scan is reused
    Scan(temp.scan).ExclusiveSum(v, v, step_total);
#pragma unroll
    for (int i = 0; i < kBuildItems; ++i) {
      if (mine + i < hi) a.start[mine + i] = carry + v[i];
    }
    carry += step_total;
  }
  grid.sync();
  for (int64_t x = thread; x < total; x += threads) {
    const unsigned cell = a.cells_in[x];
    const int slot =
        a.start[(tile_segment(x, a.B, a.P, a.Q) << (3 * a.cell_bits)) + cell] + a.rank[x];
    a.sorted[slot] = static_cast<int>(x);
    a.cells[slot] = cell;
  }
  grid.sync();
  for (int64_t w = warp; w < a.B * a.tiles; w += warps) {
    tile_build_one(a, w / a.tiles, static_cast<int>(w % a.tiles), lane);
  }
  grid.sync();
  for (int64_t w = warp; w < a.B * a.chunks; w += warps) {
    const int64_t b = w / a.chunks;
    const int t = static_cast<int>(w % a.chunks) * kTilePoints + lane;
    TileBox<T> box = t < a.tiles ? a.boxes[b * a.tiles + t] : empty_tile_box<T>();
    warp_union_box(box);
    if (lane == 0) a.chunk_boxes[w] = box;
  }
}

// The first position in cells[0, n) (ascending) whose cell is not below cell. The warp's lanes
// probe 32 positions a round, so it takes about log_32 n dependent loads rather than a binary
// search's log_2 n (14 at P = 16384, a stall at the tile kernel's start). Whole warp, the same
// cells, n and cell in every lane.
__device__ __forceinline__ int warp_lower_bound(const unsigned* __restrict__ cells, int n,
                                                unsigned cell, int lane) {
  int lo = 0, hi = n;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + kWarp - 1) / kWarp;
    const int m = lo + lane * step;
    // the lanes below cell are a prefix: lanes 0 .. c - 1
    const int c = __popc(__ballot_sync(kFullMask, m < hi && cells[m] < cell));
    if (c == 0) {
      hi = lo;  // cells[lo] is not below cell
    } else {
      hi = min(hi, lo + c * step);  // lane c's probe, where it lies below hi, is not below cell
      lo += (c - 1) * step + 1;
    }
  }
  return lo;
}

// ------------------------------------------------------ tile search, L lanes a query (2 or 4)
//
// A warp owns 32 / L queries consecutive in Morton cell order, L lanes each (lane = L * slot +
// sub), and walks the tiles alone (a block is one warp: no barrier, and an SM takes a new group
// as soon as one ends). Lane sub of a query takes points sub, sub + L, ... of each tile the warp
// scans and keeps its own list of them; the query's gate is shared by its L lanes through
// shuffles (the N-th key of the union of their lists). Against a block of 32 queries walking
// the tiles together (the kernel before this one), a warp of 8 or 16 scans fewer tiles (the
// union of fewer queries' needs is smaller) and a lane bounds 32 / L points of a scanned tile
// instead of 32 (docs/op.md, "The tile search with 4 lanes a query"). Fewer lanes a query mean
// fewer groups, each with its own tile tests and merges, but also fewer warps to fill the GPU
// and wider groups where the queries are sparse among the points; the launch picks L
// (tile_lanes_per_query).
template <int L>
struct GroupLayout {
  static_assert(L == 2 || L == 4, "2 or 4 lanes a query");
  static constexpr int kQueries = kWarp / L;       // queries a warp
  static constexpr int kPoints = kTilePoints / L;  // points of a tile a lane bounds
  // Bits 0, L, 2 L, ... of a word: shifted by sub, the tiles of a chunk that lane sub tests;
  // as they are, the points of a tile that a lane bounds (bit L i: point sub + L i).
  static constexpr unsigned kTileBits = L == 2 ? 0x55555555u : 0x11111111u;
};

// Shared memory of one warp: two staging buffers of a tile's positions and two of its shapes
// (one tile copied while the other is scanned), the boxes of the chunk of tiles being planned,
// the two buffers' indices, then the lanes' candidate queues (each part a multiple of 16 bytes).
template <typename T>
__host__ __device__ constexpr size_t group_stage_bytes() {
  return (sizeof(PointPos<T>) * 2 + sizeof(PointShape<T>) * 2 + sizeof(TileBox<T>) +
          sizeof(int) * 2) *
         kTilePoints;
}
template <typename T>
__host__ __device__ constexpr size_t group_warp_bytes() {
  return group_stage_bytes<T>() + search_queue_bytes<T>(1);
}

// The N-th smallest key of the union of the lists of a query's L lanes (each sorted, N keys;
// the lanes hold disjoint points, so the union holds N distinct points at or below it): the
// lists merged pairwise through shuffles (Batcher's half-cleaner, then a bitonic network on the
// keys as min / max pairs). Whole warp; every lane of the query gets the same key.
template <typename T, int N, int L>
__device__ __forceinline__ T group_union_nth_key(const T (&key)[N]) {
  T top[N];
#pragma unroll
  for (int s = 0; s < N; ++s) top[s] = key[s];
#pragma unroll
  for (int o = 1; o < L; o *= 2) {
    T other[N];
#pragma unroll
    for (int s = 0; s < N; ++s) other[s] = __shfl_xor_sync(kFullMask, top[N - 1 - s], o);
#pragma unroll
    for (int s = 0; s < N; ++s) top[s] = min(top[s], other[s]);
#pragma unroll
    for (int j = N / 2; j > 0; j /= 2) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if ((i & j) == 0) {
          const T lo = min(top[i], top[i + j]);
          top[i + j] = max(top[i], top[i + j]);
          top[i] = lo;
        }
      }
    }
  }
  return top[N - 1];
}

// The lists of a query's L lanes merged into one (every lane of the query gets it), through
// shuffles (merge_sorted_lists). Whole warp.
template <typename T, int N, int L>
__device__ __forceinline__ void merge_group_lists(LaneList<T, N>& list) {
#pragma unroll
  for (int o = 1; o < L; o *= 2) {
    T k[N];
    int j[N];
#pragma unroll
    for (int s = 0; s < N; ++s) {
      k[s] = __shfl_xor_sync(kFullMask, list.key[s], o);
      j[s] = __shfl_xor_sync(kFullMask, list.ind[s], o);
    }
    merge_sorted_lists(list, k, j);
  }
}

// Registers a thread of the kernel may use: for float lists up to 8, 96 (21 one-warp blocks an
// SM), up to 16, 120 (17 blocks); 255 (the compiler's choice) otherwise. Left to itself the
// compiler took 109 and 125, a block in six (in seventeen) fewer an SM, without needing them:
// under the caps it spills nothing (ptxas -v, sm_90).
template <typename T, int N>
__host__ __device__ constexpr int group_max_registers() {
  return sizeof(T) != 4 ? 255 : N <= 8 ? 96 : N <= 16 ? 120 : 255;
}

// ------------------------------------------------------ handing long walks on (tile search)
//
// On a surface a few groups walk far longer than the rest: queries far from the points (deep
// inside a closed shape) find every point at a similar distance, and their group scans most
// tiles while the others are long done (docs/op.md, "Handing long walks on"). With one warp a
// group, the kernel's end then runs a handful of warps on an idle GPU. So once every group of
// the launch has started (before, a freed SM slot goes to the next group anyway), a group that
// has scanned handoff_after_tiles() tiles, with at least kHandoffMinChunks chunks known to be in
// reach, hands the rest of its walk on: it publishes its lanes' gates in a hand-off slot, and
// the tiles of the chunks it has not yet visited are dealt to kHandoffShares shares, share x
// taking tiles x, x + 8, x + 16 and x + 24 of each chunk (a spread of the same region each).
// The group's own warp keeps share 0; warps whose own group is done take the others, one at a
// time in ticket order, starting with empty lists under the published gates, so that the
// shares' lists hold disjoint points. Each share stores its lists in the slot, and the last one
// to finish merges them and writes the group's indices. Where the slots run out, a long walk
// goes on alone.
//
// Nothing waits for a warp that has not started: a warp looks for shares only once every group
// has started, and then waits only for running groups, which never wait; the last group to
// finish closes the slots nobody claimed, which ends the warps waiting on them. Measured
// (docs/op.md): on points on a sphere the search takes 0.50-0.88x the time (the training size
// 0.50x), on points filling a cube 0.98-1.07x (the bookkeeping, where few walks are long).
constexpr int kHandoffShares = 8;
static_assert(kTilePoints % kHandoffShares == 0, "a chunk's tiles are dealt evenly");
constexpr int kHandoffRecheckTiles = 32;  // tiles between two looks at the launch's state
constexpr int kHandoffMinChunks = 2;      // chunks of the round in reach, this one included
constexpr size_t kHandoffBytes = size_t{32} << 20;  // at most this much for the slots' lists

// Tiles a group scans before it may hand on, for a batch of `tiles` tiles. 64 rather than 128:
// on the sphere 0.80x the time at the training size and 0.87x at the reference size, on the
// cube 1.04x at P = 65536. 32 where a batch has at most 512 tiles (P <= 16384): against 64, the
// reference size 0.96x (cube) and 0.86x (sphere), the training size 0.96x and 0.93x; with more
// tiles 32 took longer (sphere, P = 65536: 1.59x; presumably medium walks take the slots before
// the longest reach 32 tiles). All on an H200, docs/op.md.
__device__ __forceinline__ int handoff_after_tiles(int tiles) { return tiles <= 512 ? 32 : 64; }

// Share 0's tiles of a chunk (bit x: tile x); share x's are these shifted by x.
__host__ __device__ constexpr unsigned handoff_tiles() {
  unsigned bits = 0;
  for (int x = 0; x < kTilePoints; x += kHandoffShares) bits |= 1u << x;
  return bits;
}

// The hand-off state, zeroed by the build kernel: the launch's counters, then a line of 128
// bytes a slot (its flag, then its finished shares), so that the warps waiting on different
// slots do not all poll one line of the L2 cache.
enum HandoffCounter : int { kGroupsStarted, kGroupsDone, kSlotsClaimed, kShareTickets };
constexpr int kHandoffLine = 32;  // ints
enum HandoffFlag : int { kSlotEmpty, kSlotReady, kSlotClosed };
constexpr int64_t handoff_state_ints(int slots) { return kHandoffLine * (1 + int64_t{slots}); }

template <typename T>
struct TileHandoff {
  int* state;  // handoff_state_ints(slots)
  int* group;  // slots: the group whose walk was handed on
  int* from;   // slots: the outward chunk position its shares start at
  T* gate;     // slots x kWarp: each lane's gate when its group handed on
  T* key;      // slots x kHandoffShares x N x kWarp: each share's lists (lane-minor)
  int* ind;    // the same layout
  int slots;

  __device__ int* flag(int slot) const { return state + kHandoffLine * (1 + slot); }
  __device__ int* finished(int slot) const { return flag(slot) + 1; }
};

__device__ __forceinline__ int volatile_load(const int* x) {
  return *reinterpret_cast<const volatile int*>(x);
}

// Lane 0 of a warp whose own group is done, once every group has started: the next share of a
// handed-on walk, as (slot, share), or slot -1 where none is left. The ticket's slot may not be
// published yet: it sleeps until the slot is ready, or closed by the last group to finish.
template <typename T>
__device__ int2 take_share(const TileHandoff<T>& handoff) {
  const int ticket = atomicAdd(handoff.state + kShareTickets, 1);
  const int slot = ticket / (kHandoffShares - 1);
  if (slot >= handoff.slots) return make_int2(-1, 0);
  unsigned nap = 64;
  int flag;
  while ((flag = volatile_load(handoff.flag(slot))) == kSlotEmpty) {
    __nanosleep(nap);
    nap = min(2 * nap, 1024u);
  }
  if (flag == kSlotClosed) return make_int2(-1, 0);
  __threadfence();  // the slot's contents are read after its flag
  return make_int2(slot, 1 + ticket % (kHandoffShares - 1));
}

// The last group to finish closes the slots that no group claimed, so that the warps waiting
// on them end: no group is left to claim one. Whole warp.
template <typename T>
__device__ void close_unclaimed_slots(const TileHandoff<T>& handoff, int lane) {
  __threadfence();  // the other groups' claims were counted before they counted themselves done
  const int claimed = min(volatile_load(handoff.state + kSlotsClaimed), handoff.slots);
  for (int x = claimed + lane; x < handoff.slots; x += kWarp) {
    *reinterpret_cast<volatile int*>(handoff.flag(x)) = kSlotClosed;
  }
}

// A tile's end merges the queues and shares the gates (the whole warp, about as long as
// inserting and merging a list or two) only when some lane has queued at least this many
// candidates; a single one waits in its queue for a later merge, as do the gates it would
// have lowered, which stay sound, only looser. 2 against 1 (a merge after every tile that
// queued anything): 0.97-0.99x the time from P = 65536 up, 0.99-1.00x at the smaller sizes;
// 3 was 1.03x at the training size (docs/op.md, "The home tiles' order").
constexpr int kTileEndMerge = 2;
// A tile starts with at most kTileEndMerge - 1 candidates queued and merges mid-tile once a
// lane has more than kQueue - 2 (the scan pushes two at a time): the queue never overflows.
static_assert(kTileEndMerge >= 1 && kTileEndMerge - 1 <= kQueue - 2, "queue capacity");

// The exact key of point at of a staged tile (position and shape in shared memory).
template <typename T>
__device__ __forceinline__ T staged_point_key(const T qv[3], const PointPos<T>* pos,
                                              const PointShape<T>* shape, int at) {
  T d[3], e[3];
  return search_key(pair_distance(qv, pos[at].p, shape[at].s, shape[at].R, d, e));
}

// Fills an empty list with the lane's kPoints <= N points of a staged tile (points sub,
// sub + L, ...), sorted by (key, index) with a network; the other slots stay empty (+inf). No
// queue, no insertion. (With kPoints > N, K <= 8 and 2 lanes a query, the extra keys and a
// merge cost more than the insertions they save: 1.01x the time on the sphere at the training
// size, 68 bytes of spills; docs/op.md, "The first tile sorted in registers".)
template <typename T, int N, int kPoints, int L>
__device__ __forceinline__ void fill_list(LaneList<T, N>& list, const T qv[3],
                                          const PointPos<T>* pos, const PointShape<T>* shape,
                                          const int* tile_ind, int sub) {
  static_assert(kPoints <= N, "the tile's points fit the list");
#pragma unroll
  for (int i = 0; i < N; ++i) {
    list.key[i] = i < kPoints ? staged_point_key(qv, pos, shape, sub + L * i)
                              : static_cast<T>(INFINITY);
    list.ind[i] = i < kPoints ? tile_ind[sub + L * i] : INT_MAX;
  }
  sort_prefix<T, kPoints, N>(list.key, list.ind);
}

// One warp (block) per group of 32 / L queries. The tiles in chunks: first the home tiles
// (around where the group's middle query falls in the points' order, from that query's tile:
// home_start), then the others 32 at a time, the chunks outward (outward_chunk); a chunk's
// box, then its tiles' boxes, are tested for the group's queries at once
// (group_tile_bound_key), then per query (tile_bound_key). The positions and shapes of a tile
// some query needs are copied (cp.async, while the previous tile is scanned); each lane bounds
// its 32 / L points (point_bound_key) and computes exact keys for the ones under its gate (the
// walk's first tile, whose gates are all +inf, fills the lists directly where a lane's points
// fit them: fill_list); after a tile where some lane queued kTileEndMerge candidates, the queues
// are merged into the lists and each query's gate becomes the N-th key of its lanes' lists'
// union. At the end the L lists of a query are merged. A long walk may be handed on
// (TileHandoff), and the warp then takes shares of handed-on walks until none is left.
template <typename T, int N, int L>
__global__ void __launch_bounds__(kWarp) __maxnreg__((group_max_registers<T, N>()))
    knn_tile_search_kernel(const T* __restrict__ q, const unsigned* __restrict__ cells,
                            const int* __restrict__ sorted,
                            const PointPos<T>* __restrict__ positions,
                            const PointShape<T>* __restrict__ shapes,
                            const int* __restrict__ order, const TileBox<T>* __restrict__ boxes,
                            const TileBox<T>* __restrict__ chunk_boxes,
                            const TileHandoff<T> handoff, int64_t B, int Q, int P, int K,
                            int64_t* __restrict__ idx, int64_t* __restrict__ query_order) {
  using Layout = GroupLayout<L>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x;
  const int groups = static_cast<int>(gridDim.x);
  const int qgroups = (Q + Layout::kQueries - 1) / Layout::kQueries;
  const int sub = lane % L;
  PointPos<T>* staged_pos = reinterpret_cast<PointPos<T>*>(smem_raw);
  PointShape<T>* staged_shape = reinterpret_cast<PointShape<T>*>(staged_pos + 2 * kTilePoints);
  TileBox<T>* staged_box = reinterpret_cast<TileBox<T>*>(staged_shape + 2 * kTilePoints);
  int* staged_ind = reinterpret_cast<int*>(staged_box + kTilePoints);
  unsigned char* queue_at = smem_raw + group_stage_bytes<T>();
  const int64_t BP = B * P;
  const int tiles = (P + kTilePoints - 1) / kTilePoints;
  const int home = tiles < kTileHome ? tiles : kTileHome;
  const int chunks = (tiles + kTilePoints - 1) / kTilePoints;
  constexpr int kPosChunks = static_cast<int>(sizeof(PointPos<T>)) / 16;
  if (lane == 0) atomicAdd(handoff.state + kGroupsStarted, 1);
  if (query_order != nullptr && sub == 0) {  // this group's queries, in Morton order
    const int64_t b = blockIdx.x / qgroups;
    const int s = blockIdx.x % qgroups * Layout::kQueries + lane / L;
    if (s < Q) query_order[b * Q + s] = sorted[BP + b * Q + s] - BP;
  }

  // The warp's jobs: its own group's walk (slot -1 until it hands on), then shares of
  // handed-on walks. Kept in shared memory: registers are the kernel's tightest resource.
  __shared__ int job_group, job_slot, job_share;
  if (lane == 0) {
    job_group = static_cast<int>(blockIdx.x);
    job_slot = -1;
    job_share = 0;
  }
  __syncwarp();
#pragma unroll 1
  while (true) {
    const bool own_walk = job_slot < 0;
    const int64_t b = job_group / qgroups;
    const int first_query = job_group % qgroups * Layout::kQueries;
    const int s = first_query + lane / L;
    const bool active = s < Q;
    // the query's index in its batch (the queries' sorted values follow the points')
    const int64_t qi = active ? sorted[BP + b * Q + s] - BP - b * Q : 0;
    T qv[3] = {0, 0, 0};
    if (active) {
#pragma unroll
      for (int c = 0; c < 3; ++c) qv[c] = q[3 * (b * Q + qi) + c];
    }
    // The box of the warp's queries, for one test per tile for all of them
    // (group_tile_bound_key), which holds only when they are all finite.
    const bool group_test = __all_sync(
        kFullMask, !active || (is_finite(qv[0]) && is_finite(qv[1]) && is_finite(qv[2])));
    T qlo[3], qhi[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      qlo[a] = active ? qv[a] : static_cast<T>(INFINITY);
      qhi[a] = active ? qv[a] : -static_cast<T>(INFINITY);
#pragma unroll
      for (int o = kWarp / 2; o >= L; o >>= 1) {  // the L lanes of a query agree
        qlo[a] = min(qlo[a], __shfl_xor_sync(kFullMask, qlo[a], o));
        qhi[a] = max(qhi[a], __shfl_xor_sync(kFullMask, qhi[a], o));
      }
    }
    LaneList<T, N> list;
    list.clear();
    LaneQueue<T, N, true> queue;
    queue.key = reinterpret_cast<T*>(queue_at);
    queue.ind = reinterpret_cast<int*>(queue_at + sizeof(T) * kQueue * kWarp);
    queue.queued = 0;
    queue.own = list.key[N - 1];
    // An inactive lane never queues (its list is never read); a share starts from the gates
    // its walk had when handed on.
    queue.set_block_bound(!active ? -static_cast<T>(INFINITY)
                          : own_walk ? static_cast<T>(INFINITY)
                                     : __ldcg(handoff.gate + job_slot * kWarp + lane));
    unsigned walk_tiles = own_walk ? kFullMask : handoff_tiles() << job_share;  // bit x: tile x
    // the walk's first tile is still to come, every gate at +inf (fill_list)
    bool first_tile = Layout::kPoints <= N && own_walk;
    int until_look = own_walk ? handoff_after_tiles(tiles) : INT_MAX;  // tiles to scan before

    // Home: the tiles around where the warp's middle query falls in the points' order.
    const unsigned cell = cells[BP + b * Q + min(first_query + Layout::kQueries / 2, Q - 1)];
    const int pos = warp_lower_bound(cells + b * P, P, cell, lane);
    const int first = home_tile(pos, tiles);
    const int home_rot = home_start(pos, first, home);
    const TileBox<T>* bb = boxes + b * tiles;
    const TileBox<T>* cb = chunk_boxes + b * chunks;
    const PointPos<T>* pb = positions + b * P;
    const PointShape<T>* shb = shapes + b * P;
    const int* ob = order + b * P;
    // Starts copying tile t's positions, shapes and indices into staging buffer buf (cp.async:
    // the copy runs while the warp scans the other buffer); past the last point, a NaN record,
    // after every real point (see stage_tile). The shapes come along for every point although
    // only the marked ones are read: against reading those from global memory as their keys were
    // computed, which put a round trip to the L2 cache on every step of the key loop, this took
    // 0.85-0.95x the time on surfaces and at the reference size, 1.02-1.03x on the cube at the
    // training size (H200, docs/op.md, "The tile's shapes staged with its positions").
    auto prefetch = [&](int t, int buf) {
      const int slot_at = t * kTilePoints + lane;
      const int at = buf * kTilePoints + lane;
      if (slot_at < P) {
#pragma unroll
        for (int c = 0; c < kPosChunks; ++c) {
          __pipeline_memcpy_async(reinterpret_cast<char*>(staged_pos + at) + 16 * c,
                                  reinterpret_cast<const char*>(pb + slot_at) + 16 * c, 16);
        }
        __pipeline_memcpy_async(staged_ind + at, ob + slot_at, sizeof(int));
#pragma unroll
        for (int c = 0; c < static_cast<int>(sizeof(PointShape<T>)) / 16; ++c) {
          __pipeline_memcpy_async(reinterpret_cast<char*>(staged_shape + at) + 16 * c,
                                  reinterpret_cast<const char*>(shb + slot_at) + 16 * c, 16);
        }
      } else {
#pragma unroll
        for (int c = 0; c < 3; ++c) staged_pos[at].p[c] = static_cast<T>(NAN);
        staged_pos[at].w = 1;  // any weight: with a NaN position the bound's key is the key's
        // any shape: with a NaN position the key is NaN's (search_key: the largest finite value)
        for (int a = 0; a < 3; ++a) staged_shape[at].s[a] = 1;
        for (int a = 0; a < 9; ++a) staged_shape[at].R[a] = 0;
        staged_ind[at] = P + lane;
      }
      __pipeline_commit();
    };
    // The query's gate: one past the N-th key of its L lanes' lists' union.
    auto share_gate = [&]() {
      const T nth = group_union_nth_key<T, N, L>(list.key);
      if (active) queue.set_block_bound(min(queue.block, next_key_above(nth)));
    };
    // The widest gate over the warp (the same in every lane, so that skipping a chunk is a
    // uniform branch). Each lane's gate bounds its query's N-th key: its list holds N distinct
    // points at or below it, and so do its query's lanes together below the shared bound.
    auto widest_gate = [&]() {
      T widest = active ? min(list.key[N - 1], queue.block) : -static_cast<T>(INFINITY);
#pragma unroll
      for (int o = kWarp / 2; o > 0; o >>= 1) {
        widest = max(widest, __shfl_xor_sync(kFullMask, widest, o));
      }
      return widest;
    };
    // The tiles in chunks of up to 32: first the home tiles [first, first + home), then tiles
    // [32 c, 32 c + 32) without the home tiles, for the chunks c outward from the home tiles'
    // chunk (outward_chunk); a share takes only its tiles of each chunk (walk_tiles), from the
    // chunk its walk was handed on at. The chunks are tested 32 at a time, lane x testing the
    // x-th next one's box (the union of its tiles' boxes, chunk_boxes) against the widest gate:
    // a chunk out of every query's reach then is out of reach for good (gates only fall), and
    // the warp visits only the others, in order (before, the whole warp tested one chunk after
    // another: at P = 1M, 1024 tests a group). A visited chunk is tested again with the gates
    // of its time; if it passes, its tiles' boxes are staged together; lane x tests tile x for
    // the warp's queries (their box against the largest gate), the tiles that test keeps get
    // the per-query tests (lane sub of a query tests tiles sub, sub + L, ...), and the tiles
    // some query needs are scanned, each one's copy overlapping the previous one's scan.
#pragma unroll 1
    for (int i0 = own_walk ? -kWarp : __ldcg(handoff.from + job_slot); i0 < chunks;
         i0 += kWarp) {
      int lane_chunk = -1;  // -1: the home tiles, alone in the first round
      unsigned visits = 1;
      if (i0 >= 0) {
        const int i = i0 + lane;
        lane_chunk = i < chunks ? outward_chunk(i, first / kTilePoints, chunks) : 0;
        const T widest = widest_gate();
        const bool reach =
            !(group_test && group_tile_bound_key(qlo, qhi, cb[lane_chunk]) > widest);
        visits = __ballot_sync(kFullMask, i < chunks && reach);
      }
#pragma unroll 1
      while (visits != 0) {
        const int src = __ffs(visits) - 1;  // the lane that tested this chunk
        const int c = __shfl_sync(kFullMask, lane_chunk, src);
        visits &= visits - 1;
        const bool home_chunk = c < 0;
        // hand on from this chunk on? (uniform)
        if (!home_chunk && until_look <= 0 && __popc(visits) + 1 >= kHandoffMinChunks) {
          until_look = kHandoffRecheckTiles;
          int claimed = -1;  // -2: no slot left
          if (lane == 0 && volatile_load(handoff.state + kGroupsStarted) >= groups) {
            const int x = atomicAdd(handoff.state + kSlotsClaimed, 1);
            claimed = x < handoff.slots ? x : -2;
          }
          claimed = __shfl_sync(kFullMask, claimed, 0);
          if (claimed == -2) until_look = INT_MAX;
          if (claimed >= 0) {
            // queue.block bounds the query's N-th key by the lists alone; what waits in the
            // queues can only lower it
            handoff.gate[claimed * kWarp + lane] = queue.block;
            if (lane == 0) {
              handoff.group[claimed] = job_group;
              handoff.from[claimed] = i0 + src;
              job_slot = claimed;
            }
            __threadfence();  // the slot's contents before its flag
            __syncwarp();
            if (lane == 0) atomicExch(handoff.flag(claimed), kSlotReady);
            walk_tiles = handoff_tiles();
            until_look = INT_MAX;
          }
        }
        const int base = home_chunk ? first : c * kTilePoints;
        const int count = home_chunk ? home : min(kTilePoints, tiles - base);
        const T gate = min(list.key[N - 1], queue.block);
        const T widest = widest_gate();
        if (!home_chunk && group_test && group_tile_bound_key(qlo, qhi, cb[c]) > widest) continue;
        // Lane (and bit) x of the chunk stands for tile tile_at(x); in the home chunk the home
        // tiles from home_start, wrapping, so that the scan (lowest bit first) starts at the
        // queries' own tile.
        const auto tile_at = [&](int x) {
          const int y = home_chunk ? x + home_rot : x;
          return base + (home_chunk && y >= home ? y - home : y);
        };
        const int tile = tile_at(lane);
        const bool real = lane < count && (walk_tiles >> lane & 1) &&
                          (home_chunk || tile < first || tile >= first + home);
        const TileBox<T> box = real ? bb[tile] : empty_tile_box<T>();
        __syncwarp();  // the previous chunk's boxes are no longer read
        staged_box[lane] = box;
        const unsigned maybe = __ballot_sync(
            kFullMask, real && !(group_test && group_tile_bound_key(qlo, qhi, box) > widest));
        if (maybe == 0) continue;
        __syncwarp();
        unsigned needs = 0;  // of the tiles this lane tests, those its query needs
        if (active) {
          for (unsigned left = maybe & (Layout::kTileBits << sub); left != 0; left &= left - 1) {
            const int x = __ffs(left) - 1;
            if (!(tile_bound_key(qv, staged_box[x]) > gate)) needs |= 1u << x;
          }
        }
        unsigned todo = warp_or(needs);
        until_look -= __popc(todo);
        int buf = 0;
        if (todo != 0) prefetch(tile_at(__ffs(todo) - 1), buf);
        while (todo != 0) {
          const int x = __ffs(todo) - 1;
          todo &= todo - 1;
          if (todo != 0) {
            prefetch(tile_at(__ffs(todo) - 1), buf ^ 1);
            __pipeline_wait_prior(1);
          } else {
            __pipeline_wait_prior(0);
          }
          __syncwarp();  // every lane's copy of this tile has landed
          const PointPos<T>* pos = staged_pos + buf * kTilePoints;
          const PointShape<T>* shape = staged_shape + buf * kTilePoints;
          const int* tile_ind = staged_ind + buf * kTilePoints;
          if (first_tile) {  // uniform
            // Every point of the first tile enters a list whose gate is +inf: the lane sorts
            // its points' (key, index) pairs in registers instead of queueing and inserting
            // them one by one (exact either way: the list is the N first by (key, index)).
            first_tile = false;
            if (active) {
              // first_tile is false when kPoints > N; the clamp only keeps that case compiling
              constexpr int kFill = Layout::kPoints <= N ? Layout::kPoints : N;
              fill_list<T, N, kFill, L>(list, qv, pos, shape, tile_ind, sub);
              queue.own = next_key_above(list.key[N - 1]);
              queue.gate = min(queue.own, queue.block);
            }
            share_gate();
            __syncwarp();  // this buffer is no longer read: the next prefetch may overwrite it
            buf ^= 1;
            continue;
          }
          // This lane's points under its gate (point_bound_key); a tile with a point that has
          // no bound (its smallest lam is not > 0) is scanned whole.
          unsigned marked = 0;  // bit L i: point sub + L i
          if (active) {
            if (staged_box[x].lam > T(0)) {
#pragma unroll
              for (int i = 0; i < Layout::kPoints; ++i) {
                const PointPos<T>& r = pos[sub + L * i];
                if (point_bound_key(qv, r.p, r.w) < queue.gate) marked |= 1u << (L * i);
              }
            } else {
              marked = Layout::kTileBits;
            }
          }
          // two at a time, for instruction-level parallelism
          while (__any_sync(kFullMask, marked != 0)) {
            constexpr int kPair = 2;
            int at[kPair];
            bool real_point[kPair];
#pragma unroll
            for (int u = 0; u < kPair; ++u) {
              real_point[u] = marked != 0;
              at[u] = sub + (real_point[u] ? __ffs(marked) - 1 : 0);
              marked &= marked - 1;
            }
            T k[kPair];
#pragma unroll
            for (int u = 0; u < kPair; ++u) {
              k[u] = staged_point_key(qv, pos, shape, at[u]);
            }
#pragma unroll
            for (int u = 0; u < kPair; ++u) {
              if (real_point[u] && k[u] < queue.gate) queue.push(k[u], tile_ind[at[u]], lane);
            }
            if (__any_sync(kFullMask, queue.queued > kQueue - kPair)) queue.merge_into(list, lane);
          }
          if (__any_sync(kFullMask, queue.queued >= kTileEndMerge)) {
            queue.merge_into(list, lane);
            share_gate();
          }
          __syncwarp();  // this buffer is no longer read: the next prefetch may overwrite it
          buf ^= 1;
        }
      }
    }
    if (__any_sync(kFullMask, queue.queued > 0)) queue.merge_into(list, lane);
    // A share stores its lists; the last of its walk's shares to finish merges them all.
    bool write = true;
    const int slot = job_slot, share = job_share;
    if (slot >= 0) {
      const int64_t at = (static_cast<int64_t>(slot) * kHandoffShares + share) * N * kWarp + lane;
#pragma unroll
      for (int x = 0; x < N; ++x) {
        __stcg(handoff.key + at + x * kWarp, list.key[x]);
        __stcg(handoff.ind + at + x * kWarp, list.ind[x]);
      }
      __threadfence();  // the lists before the count
      __syncwarp();
      int done = 0;
      if (lane == 0) done = atomicAdd(handoff.finished(slot), 1) + 1;
      write = __shfl_sync(kFullMask, done, 0) == kHandoffShares;
      if (write) {
        __threadfence();  // the other shares' lists after their counts
#pragma unroll 1
        for (int other = 0; other < kHandoffShares; ++other) {
          if (other == share) continue;
          const int64_t from = (static_cast<int64_t>(slot) * kHandoffShares + other) * N * kWarp;
          T k[N];
          int j[N];
#pragma unroll
          for (int x = 0; x < N; ++x) {
            k[x] = __ldcg(handoff.key + from + x * kWarp + lane);
            j[x] = __ldcg(handoff.ind + from + x * kWarp + lane);
          }
          merge_sorted_lists(list, k, j);
        }
      }
    }
    if (write) {
      merge_group_lists<T, N, L>(list);
#pragma unroll
      for (int x = 0; x < N; ++x) {
        if (active && x < K && x % L == sub) idx[(b * Q + qi) * K + x] = list.ind[x];
      }
    }
    if (own_walk) {
      if (slot >= 0) __threadfence();  // its slot's flag before this count
      __syncwarp();
      int done = 0;
      if (lane == 0) done = atomicAdd(handoff.state + kGroupsDone, 1) + 1;
      if (__shfl_sync(kFullMask, done, 0) == groups) close_unclaimed_slots(handoff, lane);
    }
    // The next job: a share of a handed-on walk, where every group has started.
    int2 next = make_int2(-1, 0);
    if (lane == 0 && volatile_load(handoff.state + kGroupsStarted) >= groups) {
      next = take_share(handoff);
    }
    if (lane == 0 && next.x >= 0) {
      job_group = __ldcg(handoff.group + next.x);
      job_slot = next.x;
      job_share = next.y;
    }
    if (__shfl_sync(kFullMask, next.x, 0) < 0) return;
    __syncwarp();
  }
}

// Lanes a query in the tile search: 2 where each batch has at least a quarter as many queries
// as points and the call at least kTileTwoLaneQueries queries, else 4. Measured on an H200
// (docs/op.md, "Lanes a query"): 2 lanes took 0.92-1.03x the time of 4 where P <= 4 Q (the
// training size 0.95x, P = 1M with Q = 262144 0.65x), but 1.13x at P = 65536 with Q = 12288
// (K = 8) and 3.7-3.9x at P = 131072 with Q = 12288: where the queries are sparse among the
// points, a group of 16 consecutive queries spans more tiles, and half as many warps leave the
// GPU short of resident warps. The same holds with few queries: with B Q < 16384 (at most 1024
// warps of 16), 4 lanes took 0.71-0.89x the time of 2 (H100, P = 2048-16384, docs/op.md,
// "Surfaces, the CUDA grid and the chunk tests").
constexpr int64_t kTileTwoLaneQueries = 16384;
int tile_lanes_per_query(const ProblemSize& n) {
  return n.P <= 4 * n.Q && n.B * n.Q >= kTileTwoLaneQueries ? 2 : 4;
}

// Bits an axis of the tile search's sort cells (tile_count_cell): the most with at most one cell
// a point or query of the larger kind (2^(3 bits) <= max(P, Q)), so that a cell holds one to
// eight of them, and the counts and offsets (4 bytes each a cell, two segments a batch) take at
// most 16 bytes a point or query; at most 7 (2^21 cells a segment), and fewer where the counts
// of all B batches would not fit an int index. Against 8 cells an entry (one bit more), the
// build's zeroing and scan of the counts shrink 8x and the whole search took 0.96-1.0x the time
// on every case of benchmarks/tile_cases.py (docs/op.md, "The tile build's phases").
int tile_cell_bits(const ProblemSize& n) {
  int bits = 0;
  while (bits < 7 && (int64_t{1} << (3 * (bits + 1))) <= std::max(n.P, n.Q) &&
         (2 * n.B << (3 * (bits + 1))) < INT_MAX) {
    ++bits;
  }
  return bits;
}

// Blocks of the cooperative build kernel that the device holds at once (a cooperative launch
// may not ask for more): queried once per device and type, not per call.
template <typename T>
int tile_build_resident_blocks(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<int> blocks;  // per device; 0 until queried
  const std::lock_guard<std::mutex> lock(mutex);
  if (blocks.empty()) blocks.resize(c10::cuda::device_count());
  int& resident = blocks.at(device);
  if (resident == 0) {  // the guard of knn_search_cuda made device the current one
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, tile_build_kernel<T>,
                                                                 kBuildThreads, 0));
    resident = per_sm * device_facts(device).multiprocessors;
  }
  return resident;
}

template <typename T, int N>
void launch_tile_search(const at::Tensor& q, const at::Tensor& p, const at::Tensor& sigma,
                        const at::Tensor& R, const ProblemSize& n, at::Tensor& idx,
                        int64_t* query_order, cudaStream_t stream) {
  TORCH_CHECK(n.B * (n.P + n.Q) < INT_MAX,
              "neusdf: the CUDA tile search supports B * (P + Q) < 2^31");
  const int64_t BP = n.B * n.P, total = n.B * (n.P + n.Q);
  const int tiles = static_cast<int>((n.P + kTilePoints - 1) / kTilePoints);
  const int chunks = (tiles + kTilePoints - 1) / kTilePoints;
  const int cell_bits = tile_cell_bits(n);
  const int64_t counters = 2 * n.B << (3 * cell_bits);  // < INT_MAX (tile_cell_bits)
  const int blocks = static_cast<int>(std::min<int64_t>(
      tile_build_resident_blocks<T>(q.get_device()), (total + kBuildThreads - 1) / kBuildThreads));
  const int lanes = tile_lanes_per_query(n);
  const int64_t group_queries = kWarp / lanes;
  const int64_t groups = n.B * ((n.Q + group_queries - 1) / group_queries);  // a block each
  TORCH_CHECK(groups < INT_MAX, "neusdf: the CUDA tile search supports < 2^31 groups of queries");
  // hand-off slots: one a group, within kHandoffBytes of lists
  const size_t share_bytes = (sizeof(T) + sizeof(int)) * N * kWarp;
  const int slots = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(groups, kHandoffBytes / (kHandoffShares * share_bytes))));
  // One allocation for every buffer of the call (each a caching-allocator call of several
  // microseconds of host time, which a small search's kernels do not hide).
  Workspace ws;
  const size_t box_at = ws.reserve(sizeof(OrderedBits<T>) * 6 * n.B);
  const size_t counts_at = ws.reserve(sizeof(int) * counters);
  const size_t start_at = ws.reserve(sizeof(int) * counters);
  const size_t block_sums_at = ws.reserve(sizeof(int) * blocks);
  const size_t cells_in_at = ws.reserve(sizeof(unsigned) * total);
  const size_t rank_at = ws.reserve(sizeof(int) * total);
  const size_t cells_at = ws.reserve(sizeof(unsigned) * total);
  const size_t sorted_at = ws.reserve(sizeof(int) * total);
  const size_t positions_at = ws.reserve(sizeof(PointPos<T>) * BP);
  const size_t shapes_at = ws.reserve(sizeof(PointShape<T>) * BP);
  const size_t order_at = ws.reserve(sizeof(int) * BP);
  const size_t boxes_at = ws.reserve(sizeof(TileBox<T>) * n.B * tiles);
  const size_t chunk_boxes_at = ws.reserve(sizeof(TileBox<T>) * n.B * chunks);
  const size_t state_at = ws.reserve(sizeof(int) * handoff_state_ints(slots));
  const size_t slot_group_at = ws.reserve(sizeof(int) * slots);
  const size_t slot_from_at = ws.reserve(sizeof(int) * slots);
  const size_t slot_gate_at = ws.reserve(sizeof(T) * kWarp * slots);
  const size_t slot_key_at = ws.reserve(sizeof(T) * kHandoffShares * N * kWarp * slots);
  const size_t slot_ind_at = ws.reserve(sizeof(int) * kHandoffShares * N * kWarp * slots);
  const at::Tensor buffer = ws.allocate(q.options());
  const TileBuild<T> build{p.data_ptr<T>(),
                           q.data_ptr<T>(),
                           sigma.data_ptr<T>(),
                           R.data_ptr<T>(),
                           n.B,
                           n.P,
                           n.Q,
                           cell_bits,
                           tiles,
                           chunks,
                           counters,
                           ws.ptr<OrderedBits<T>>(buffer, box_at),
                           ws.ptr<int>(buffer, counts_at),
                           ws.ptr<int>(buffer, start_at),
                           ws.ptr<int>(buffer, block_sums_at),
                           ws.ptr<unsigned>(buffer, cells_in_at),
                           ws.ptr<int>(buffer, rank_at),
                           ws.ptr<unsigned>(buffer, cells_at),
                           ws.ptr<int>(buffer, sorted_at),
                           ws.ptr<PointPos<T>>(buffer, positions_at),
                           ws.ptr<PointShape<T>>(buffer, shapes_at),
                           ws.ptr<int>(buffer, order_at),
                           ws.ptr<TileBox<T>>(buffer, boxes_at),
                           ws.ptr<TileBox<T>>(buffer, chunk_boxes_at),
                           ws.ptr<int>(buffer, state_at),
                           handoff_state_ints(slots)};
  const TileHandoff<T> handoff{build.handoff_state,
                               ws.ptr<int>(buffer, slot_group_at),
                               ws.ptr<int>(buffer, slot_from_at),
                               ws.ptr<T>(buffer, slot_gate_at),
                               ws.ptr<T>(buffer, slot_key_at),
                               ws.ptr<int>(buffer, slot_ind_at),
                               slots};
  void* args[] = {const_cast<TileBuild<T>*>(&build)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(tile_build_kernel<T>, blocks, kBuildThreads, args, 0,
                                             stream));
  const auto kernel =
      lanes == 2 ? knn_tile_search_kernel<T, N, 2> : knn_tile_search_kernel<T, N, 4>;
  kernel<<<groups, kWarp, group_warp_bytes<T>(), stream>>>(
      q.data_ptr<T>(), build.cells, build.sorted, build.positions, build.shapes, build.order,
      build.boxes, build.chunk_boxes, handoff, n.B,
      static_cast<int>(n.Q), static_cast<int>(n.P), static_cast<int>(n.K),
      idx.data_ptr<int64_t>(), query_order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls launch<T, N>(...) with N = K rounded up to a power of two (K <= 32).
#define NEUSDF_DISPATCH_LIST_SIZE(K, LAUNCH, ...) \
  do {                                            \
    if ((K) <= 1) {                               \
      LAUNCH<T, 1>(__VA_ARGS__);                  \
    } else if ((K) <= 2) {                        \
      LAUNCH<T, 2>(__VA_ARGS__);                  \
    } else if ((K) <= 4) {                        \
      LAUNCH<T, 4>(__VA_ARGS__);                  \
    } else if ((K) <= 8) {                        \
      LAUNCH<T, 8>(__VA_ARGS__);                  \
    } else if ((K) <= 16) {                       \
      LAUNCH<T, 16>(__VA_ARGS__);                 \
    } else {                                      \
      LAUNCH<T, 32>(__VA_ARGS__);                 \
    }                                             \
  } while (0)

// knn_search's body; query_order (B * Q int64 on q's device, or null): where to write the
// order the method visited the queries in (knn_search_ordered).
at::Tensor search_cuda(const at::Tensor& q_in, const at::Tensor& p_in,
                       const std::optional<at::Tensor>& sigma_opt,
                       const std::optional<at::Tensor>& R_opt, int64_t K,
                       c10::string_view method, at::Tensor* query_order) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto [sigma_in, R_in] = search_metric(sigma_opt, R_opt);
  const ProblemSize n = check_points(q_in, p_in, sigma_in, R_in, K);
  const SearchMethod how =
      choose_search_method(method, n, /*cuda=*/true, /*euclidean=*/!sigma_in.defined());
  // the brute force's padded last tile numbers its records up to P + 255
  TORCH_CHECK(n.P < INT_MAX - 256 && n.Q < INT_MAX,
              "neusdf: knn_search supports P < 2^31 - 256 and Q < 2^31 on CUDA");
  TORCH_CHECK(n.B * ((n.Q + kWarp - 1) / kWarp) < INT_MAX, "neusdf: B * Q too large");
  at::Tensor idx = at::empty({n.B, n.Q, K}, q_in.options().dtype(at::kLong));
  if (query_order != nullptr) *query_order = at::empty({n.B * n.Q}, idx.options());
  if (n.B * n.Q == 0) return idx;
  int64_t* order = query_order != nullptr ? query_order->data_ptr<int64_t>() : nullptr;
  // The Euclidean metric: the brute force's own kernel (K <= 32); the other paths run the
  // general kernels on the identity (bit for bit the same keys).
  const bool euclidean_kernel = how == SearchMethod::kBrute && K <= 32;
  if (!sigma_in.defined() && !euclidean_kernel) std::tie(sigma_in, R_in) = euclidean_metric(p_in);
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous();
  const at::Tensor sigma = sigma_in.defined() ? sigma_in.contiguous() : sigma_in;
  const at::Tensor R = R_in.defined() ? R_in.contiguous() : R_in;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_search_cuda", [&] {
    using T = scalar_t;
    if (how == SearchMethod::kTile) {
      NEUSDF_DISPATCH_LIST_SIZE(K, launch_tile_search, q, p, sigma, R, n, idx, order, stream);
    } else if (how == SearchMethod::kGrid) {
      NEUSDF_DISPATCH_LIST_SIZE(K, launch_grid_search, q, p, sigma, R, n, idx, order, stream);
    } else if (K <= 32) {
      NEUSDF_DISPATCH_LIST_SIZE(K, launch_search, q, p, sigma, R, n, idx, order, stream);
    } else {
      launch_search_large_k<T>(q, p, sigma, R, n, idx, stream);
      if (query_order != nullptr) at::arange_out(*query_order, n.B * n.Q);
    }
  });
  return idx;
}

at::Tensor knn_search_cuda(const at::Tensor& q, const at::Tensor& p,
                           const std::optional<at::Tensor>& sigma,
                           const std::optional<at::Tensor>& R, int64_t K,
                           c10::string_view method) {
  return search_cuda(q, p, sigma, R, K, method, nullptr);
}

std::tuple<at::Tensor, at::Tensor> knn_search_ordered_cuda(
    const at::Tensor& q, const at::Tensor& p, const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& R, int64_t K, c10::string_view method) {
  at::Tensor order;
  at::Tensor idx = search_cuda(q, p, sigma, R, K, method, &order);
  return {idx, order};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CUDA, m) {
  m.impl("knn_search", &neusdf::knn_search_cuda);
  m.impl("knn_search_ordered", &neusdf::knn_search_ordered_cuda);
}
