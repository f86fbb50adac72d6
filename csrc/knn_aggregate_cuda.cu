// CUDA kernels of the anisotropic kNN aggregation, its backward and double backward
// (contracts in knn_aggregate.h; the search is in knn_search_cuda.cu).
//
// One warp per query. Lanes take the K neighbours for the per-pair geometry, then the F
// feature channels for the feature sums, so every feature row is read and scattered with
// coalesced accesses. Gradients of points (shared by many queries) are scattered with atomics;
// their order varies, so the CUDA gradients are deterministic only up to rounding.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"
#include "knn_cuda_helpers.cuh"

namespace neusdf {
namespace {

constexpr int kQueriesPerWarpBlock = 8;  // warps (= queries) per block of the warp-per-query kernels

// Whether dot_and_scatter may take channel pairs: float rows of even length, 8-byte aligned.
bool channel_pairs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t F) {
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0;
  };
  return a.scalar_type() == at::kFloat && F % 2 == 0 && aligned(a) && aligned(b) && aligned(c);
}

template <typename T>
__global__ void knn_aggregate_kernel(const T* __restrict__ q, const T* __restrict__ p,
                                     const T* __restrict__ f, const T* __restrict__ sigma,
                                     const T* __restrict__ R, const int64_t* __restrict__ idx,
                                     ProblemSize n, T* __restrict__ f_out, T* __restrict__ w,
                                     T* __restrict__ dists) {
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
    load_lane_pair(p, sigma, R, idx, qv, b, t, in_range, n.P, pr);
    if (in_range) {
      w[t] = pr.ok ? pr.w : nan;
      dists[t] = pr.ok ? pr.D : nan;
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
    const T* __restrict__ sigma, const T* __restrict__ R, const int64_t* __restrict__ idx,
    ProblemSize n, bool pairs, T* __restrict__ grad_q, T* __restrict__ grad_p,
    T* __restrict__ grad_f, T* __restrict__ grad_sigma, T* __restrict__ grad_R) {
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
    load_lane_pair(p, sigma, R, idx, qv, b, t, k0 + lane < n.K, n.P, pr);
    const int nk = static_cast<int>(n.K - k0 < kWarp ? n.K - k0 : kWarp);
    // gf . f_k on lane k; grad_f[k] += w_k gf.
    const T dot = neighbour_dots_and_scatter(gfq, f, grad_f, pr.j, pr.w, nk, b, n, lane, pairs);
    if (pr.ok) {
      const T dbar = backward_dbar(gD ? gD[t] : T(0), pr.w, dot + (gw ? gw[t] : T(0)));
#pragma unroll
      for (int c = 0; c < 3; ++c) gq[c] += dbar * pr.g[c];
      T gp[3] = {0, 0, 0}, gs[3] = {0, 0, 0}, gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      add_first_order_point_terms(dbar, pr.s, pr.d, pr.u, pr.g, gp, gs, gR);
      atomic_add_point_terms(b * n.P + pr.j, gp, gs, gR, grad_p, grad_sigma, grad_R);
    }
  }
#pragma unroll
  for (int c = 0; c < 3; ++c) gq[c] = warp_sum(gq[c]);
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < 3; ++c) grad_q[3 * bq + c] = gq[c];
  }
}

template <typename T>
__global__ void knn_aggregate_double_backward_kernel(
    const T* __restrict__ ggq, const T* __restrict__ gf, const T* __restrict__ gw,
    const T* __restrict__ gD, const T* __restrict__ q, const T* __restrict__ p,
    const T* __restrict__ f, const T* __restrict__ sigma, const T* __restrict__ R,
    const int64_t* __restrict__ idx, ProblemSize n, bool pairs, T* __restrict__ g_gf,
    T* __restrict__ g_gw, T* __restrict__ g_gD, T* __restrict__ g_q, T* __restrict__ g_p,
    T* __restrict__ g_f, T* __restrict__ g_sigma, T* __restrict__ g_R) {
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
    load_lane_pair(p, sigma, R, idx, qv, b, t, k0 + lane < n.K, n.P, pr);
    const T es = pr.ok ? e[0] * pr.g[0] + e[1] * pr.g[1] + e[2] * pr.g[2] : T(0);
    const T ws = pr.w * es;  // w_k (e . g_k)
    const int nk = static_cast<int>(n.K - k0 < kWarp ? n.K - k0 : kWarp);
    // gf . f_k on lane k; g_f[k] -= ws_k gf.
    const T dot = neighbour_dots_and_scatter(gfq, f, g_f, pr.j, -ws, nk, b, n, lane, pairs);
    // Pass over channels: g_gf[c] -= sum_k ws_k f_k[c] (this warp owns the row).
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
      const DoubleBackwardScalars<T> sc =
          double_backward_scalars(e, pr.g, pr.w, dot + (gw ? gw[t] : T(0)), gD ? gD[t] : T(0));
      if (gD) g_gD[t] = sc.es;
      if (gw) g_gw[t] = -sc.ws;
      add_double_backward_query_terms(sc, e, pr.s, pr.R, pr.g, gq);
      T gp[3] = {0, 0, 0}, gs[3] = {0, 0, 0}, gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      add_double_backward_point_terms(sc, e, pr.s, pr.R, pr.d, pr.u, pr.g, gp, gs, gR);
      atomic_add_point_terms(b * n.P + pr.j, gp, gs, gR, g_p, g_sigma, g_R);
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
  at::Tensor dists = at::empty({n.B, n.Q, n.K}, q_in.options());
  if (n.B * n.Q == 0) return {f_out, w, dists};
  if (n.F == 0) f_out.zero_();
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_cuda", [&] {
    using T = scalar_t;
    knn_aggregate_kernel<T><<<warp_blocks(n), kQueriesPerWarpBlock * kWarp, 0, stream>>>(
        q.data_ptr<T>(), p.data_ptr<T>(), f.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
        idx.data_ptr<int64_t>(), n, f_out.data_ptr<T>(), w.data_ptr<T>(), dists.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f_out, w, dists};
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
  at::Tensor grad_q = at::empty_like(q_in, at::MemoryFormat::Contiguous);  // written whole
  at::Tensor grad_p = at::empty_like(p_in, at::MemoryFormat::Contiguous);  // accumulated:
  at::Tensor grad_f = at::empty_like(f_in, at::MemoryFormat::Contiguous);  // zeroed below
  at::Tensor grad_sigma = at::empty_like(sigma_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_R = at::empty_like(R_in, at::MemoryFormat::Contiguous);
  zero_buffers({grad_p, grad_f, grad_sigma, grad_R}, stream);
  if (n.B * n.Q == 0) return {grad_q, grad_p, grad_f, grad_sigma, grad_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_backward_cuda", [&] {
    using T = scalar_t;
    knn_aggregate_backward_kernel<T><<<warp_blocks(n), kQueriesPerWarpBlock * kWarp, 0, stream>>>(
        data_or_null<T>(gf), data_or_null<T>(gw), data_or_null<T>(gD), q.data_ptr<T>(),
        p.data_ptr<T>(), f.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
        idx.data_ptr<int64_t>(), n, gf.defined() && channel_pairs(gf, f, grad_f, n.F),
        grad_q.data_ptr<T>(), grad_p.data_ptr<T>(), grad_f.data_ptr<T>(), grad_sigma.data_ptr<T>(),
        grad_R.data_ptr<T>());
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
  at::Tensor g_sigma = at::empty({n.B, n.P, 3}, opts);
  at::Tensor g_R = at::empty({n.B, n.P, 3, 3}, opts);
  zero_buffers({g_gw, g_gD, g_p, g_f, g_sigma, g_R}, stream);
  if (n.B * n.Q == 0) return {g_gf, g_gw, g_gD, g_q, g_p, g_f, g_sigma, g_R};
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), f = f_in.contiguous(),
                   sigma = sigma_in.contiguous(), R = R_in.contiguous(), idx = idx_in.contiguous(),
                   ggq = ggq_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_aggregate_double_backward_cuda", [&] {
    using T = scalar_t;
    T* none = nullptr;
    knn_aggregate_double_backward_kernel<T>
        <<<warp_blocks(n), kQueriesPerWarpBlock * kWarp, 0, stream>>>(
            ggq.data_ptr<T>(), data_or_null<T>(gf), data_or_null<T>(gw), data_or_null<T>(gD),
            q.data_ptr<T>(), p.data_ptr<T>(), f.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
            idx.data_ptr<int64_t>(), n, gf.defined() && channel_pairs(gf, f, g_f, n.F),
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
