// Per-pair math of the anisotropic kNN aggregation, shared by the CPU and CUDA kernels.
//
// For a query q and a neural point k with position p, precisions s (sigma) and axes R (rows):
//   d = q - p,  u = R d,  D = sum_i s_i u_i^2,  w = exp(-D),  g = dD/dq = 2 R^T (s * u).
// Every function here works on one (query, point) pair with plain arrays, so the same code
// compiles for the host and the device; array indices are compile-time constants after
// unrolling, which keeps everything in registers on the GPU.
#pragma once

#ifdef __CUDACC__
#define NEUSDF_HD __host__ __device__ __forceinline__
#else
#define NEUSDF_HD inline
#endif

namespace neusdf {

// Largest finite value: the search maps NaN and +inf distances onto it so that they sort last
// (behind every finite distance, ties by index) instead of poisoning the comparisons.
template <typename T>
struct FiniteMax;
template <>
struct FiniteMax<float> {
  static constexpr float value = 3.402823466e+38F;
};
template <>
struct FiniteMax<double> {
  static constexpr double value = 1.7976931348623157e+308;
};

// Sort key of a distance for the neighbour search: NaN and +inf become the largest finite value.
template <typename T>
NEUSDF_HD T search_key(T D) {
  return D <= FiniteMax<T>::value ? D : FiniteMax<T>::value;
}

// Strict "comes first" order of the search: smaller key, then lower index.
template <typename T>
NEUSDF_HD bool comes_before(T key_a, long long idx_a, T key_b, long long idx_b) {
  return key_a < key_b || (key_a == key_b && idx_a < idx_b);
}

// a * b + c. Fused explicitly on the GPU, so that every kernel rounds the distance the same
// way whatever the compiler would contract in its context (the grid and brute-force searches
// must agree to the last bit); unfused on the host (built with -ffp-contract=off).
template <typename T>
NEUSDF_HD T mul_add(T a, T b, T c) {
#ifdef __CUDA_ARCH__
  return fma(a, b, c);
#else
  return a * b + c;
#endif
}

// d = q - p, u = R d; returns D = sum_i s_i u_i^2.
template <typename T>
NEUSDF_HD T pair_distance(const T q[3], const T p[3], const T s[3], const T R[9], T d[3],
                          T u[3]) {
#pragma unroll
  for (int j = 0; j < 3; ++j) d[j] = q[j] - p[j];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    u[i] = mul_add(R[3 * i + 2], d[2], mul_add(R[3 * i + 1], d[1], R[3 * i] * d[0]));
  }
  return mul_add(s[2] * u[2], u[2], mul_add(s[1] * u[1], u[1], s[0] * u[0] * u[0]));
}

// pair_distance with sigma = 1 and R = I, equal to it to the last bit: there u = R d is d
// exactly (the zero terms of each row add signed zeros, and a zero's sign is squared away),
// s * u is u, and D is mul_add(u2, u2, mul_add(u1, u1, u0 * u0)) as here. A non-finite d
// gives NaN or +inf in both, which search_key maps to the same key.
template <typename T>
NEUSDF_HD T euclidean_distance(const T q[3], const T p[3]) {
  const T d0 = q[0] - p[0], d1 = q[1] - p[1], d2 = q[2] - p[2];
  return mul_add(d2, d2, mul_add(d1, d1, d0 * d0));
}

// out = 2 R^T (s * v): with v = u this is g = dD/dq; with v = R e it is H e, H = d^2 D / dq^2.
template <typename T>
NEUSDF_HD void scaled_transpose(const T s[3], const T R[9], const T v[3], T out[3]) {
  const T a0 = 2 * s[0] * v[0], a1 = 2 * s[1] * v[1], a2 = 2 * s[2] * v[2];
#pragma unroll
  for (int j = 0; j < 3; ++j) out[j] = R[j] * a0 + R[3 + j] * a1 + R[6 + j] * a2;
}

// Per-point gradient terms of one pair for an upstream c = dL/dD of that pair:
//   dD/dp = -g, dD/ds_i = u_i^2, dD/dR_ij = 2 s_i u_i d_j.
// Adds c * (-g) to gp, c * u^2 to gs and c * 2 s u d^T to gR.
template <typename T>
NEUSDF_HD void add_first_order_point_terms(T c, const T s[3], const T d[3], const T u[3],
                                           const T g[3], T gp[3], T gs[3], T gR[9]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    gp[i] -= c * g[i];
    gs[i] += c * u[i] * u[i];
    const T a = 2 * c * s[i] * u[i];
#pragma unroll
    for (int j = 0; j < 3; ++j) gR[3 * i + j] += a * d[j];
  }
}

// h = H e with H = d^2 D / dq^2 = 2 R^T diag(s) R; also returns a = R e.
template <typename T>
NEUSDF_HD void hessian_times(const T s[3], const T R[9], const T e[3], T a[3], T h[3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) a[i] = R[3 * i] * e[0] + R[3 * i + 1] * e[1] + R[3 * i + 2] * e[2];
  scaled_transpose(s, R, a, h);
}

// Per-point terms of the double backward that come from differentiating g itself, for the
// scalar e . g of one pair (e = upstream of the query gradient), weighted by c:
//   d(e.g)/dp = -H e,  d(e.g)/ds_i = 2 a_i u_i,  d(e.g)/dR_ij = 2 s_i (e_j u_i + a_i d_j),
// with a = R e. (The query side, +c H e, is added by the caller through hessian_times.)
template <typename T>
NEUSDF_HD void add_second_order_point_terms(T c, const T e[3], const T s[3], const T R[9],
                                            const T d[3], const T u[3], T gp[3], T gs[3],
                                            T gR[9]) {
  T a[3], h[3];
  hessian_times(s, R, e, a, h);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    gp[i] -= c * h[i];
    gs[i] += 2 * c * a[i] * u[i];
    const T cs = 2 * c * s[i];
#pragma unroll
    for (int j = 0; j < 3; ++j) gR[3 * i + j] += cs * (e[j] * u[i] + a[i] * d[j]);
  }
}

// dL/dD of one pair in the backward: Dbar = gD - w (gf . f_k + gw), with inner = gf . f_k + gw
// (dL/dw of the pair; absent upstreams count as zero).
template <typename T>
NEUSDF_HD T backward_dbar(T gD, T w, T inner) {
  return gD - w * inner;
}

// Per-pair scalars of the double backward for an upstream e = ggq of the query gradient:
//   es = e . g, ws = w es, dbar = gD - w inner (as in the backward), E = es w inner,
// with inner = gf . f_k + gw. The pair's gradients are then d/dgD = es, d/dgw = -ws,
// d/dgf = -ws f_k, d/df_k = -ws gf, and the geometric terms of the two functions below.
template <typename T>
struct DoubleBackwardScalars {
  T es, ws, dbar, E;
};

template <typename T>
NEUSDF_HD DoubleBackwardScalars<T> double_backward_scalars(const T e[3], const T g[3], T w,
                                                           T inner, T gD) {
  DoubleBackwardScalars<T> sc;
  sc.es = e[0] * g[0] + e[1] * g[1] + e[2] * g[2];
  sc.ws = w * sc.es;
  sc.dbar = backward_dbar(gD, w, inner);
  sc.E = sc.es * w * inner;
  return sc;
}

// Query side of one pair in the double backward: gq += E g + dbar H e.
template <typename T>
NEUSDF_HD void add_double_backward_query_terms(const DoubleBackwardScalars<T>& sc, const T e[3],
                                               const T s[3], const T R[9], const T g[3],
                                               T gq[3]) {
  T a[3], h[3];
  hessian_times(s, R, e, a, h);
#pragma unroll
  for (int c = 0; c < 3; ++c) gq[c] += sc.E * g[c] + sc.dbar * h[c];
}

// Point side of one pair in the double backward (position, precisions, axes): the first-order
// terms weighted by E plus the terms of differentiating g, weighted by dbar.
template <typename T>
NEUSDF_HD void add_double_backward_point_terms(const DoubleBackwardScalars<T>& sc, const T e[3],
                                               const T s[3], const T R[9], const T d[3],
                                               const T u[3], const T g[3], T gp[3], T gs[3],
                                               T gR[9]) {
  add_first_order_point_terms(sc.E, s, d, u, g, gp, gs, gR);
  add_second_order_point_terms(sc.dbar, e, s, R, d, u, gp, gs, gR);
}

}  // namespace neusdf
