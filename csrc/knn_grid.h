// The uniform grid of the exact sub-linear neighbour search, shared by the CPU and CUDA
// kernels (knn_search_cpu.cpp, knn_search_cuda.cu).
//
// Per batch, the points are sorted by grid cell with a counting sort (bucket start offsets from
// a cumulative sum; no trees). A query visits the cells in rings of growing Chebyshev distance
// around its own cell and skips what a lower bound proves cannot hold a better neighbour:
//
//   D_k = sum_j sigma_kj (R_k (q - p_k))_j^2 >= lam_k |q - p_k|^2,
//
// lam_k a lower bound on the smallest eigenvalue of M_k = R_k^T diag(sigma_k) R_k (R need not
// be orthonormal), reduced further so that it also bounds the distance *as computed* in the
// kernels' precision (pair_distance, rounding included). A cell is skipped when
// min(lam over its points) * gap(q, cell)^2 exceeds the current K-th best distance, and the
// rings stop when min(lam over all grid points) * gap(q, unvisited cells)^2 does: the result
// is exactly the brute-force one (same idx, same order, ties to the lower index).
//
// Points the bound cannot cover (a non-finite position, precision or axis, a precision <= 0,
// or a lam below 1e-3 of the batch's median (estimated on a sample), which would stop the
// pruning for everyone) go to one extra bucket that every query scans in full.
#pragma once

#include <cmath>
#include <cstdint>

#include "knn_aggregate_math.h"

namespace neusdf {

template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr double value = 1.1920928955078125e-07;
};
template <>
struct Eps<double> {
  static constexpr double value = 2.220446049250313e-16;
};

// Grid cells per axis for P points: about points_per_cell points per cell, at most 128 cells
// per axis (2^21 cells). The same for every batch and known on the host, so no device value is
// needed to size the grid. (Counted on the CPU for uniform clouds of 16k to 262k points and K =
// 8 or 16: cells visited + distances evaluated per query were lowest at two points per cell; at
// P = 262144, K = 16 a query visits about 290 cells and evaluates about 180 distances. The
// CUDA search uses 8: knn_search_cuda.cu says why.)
inline int grid_cells_per_axis(int64_t P, int points_per_cell = 2) {
  int G = 1;
  while (G < 128 && points_per_cell * static_cast<int64_t>(G + 1) * (G + 1) * (G + 1) <= P) ++G;
  return G;
}

// Points with lam below this fraction of the batch's median lam go to the scanned-by-all bucket.
// The median is that of a sample of at most kLamMedianSample points (every lam_sample_stride-th):
// any threshold keeps the search exact (it only decides which points every query scans), and
// an exact median of a million values took 5.6 ms on an H100 (torch.median), more than the
// search itself. The median taken is the upper one, sample[n / 2] in sorted order.
constexpr double kLamFloorOfMedian = 1e-3;
constexpr int64_t kLamMedianSample = 4096;

inline int64_t lam_sample_stride(int64_t P) {
  return P > kLamMedianSample ? (P + kLamMedianSample - 1) / kLamMedianSample : 1;
}

template <typename T>
NEUSDF_HD bool is_finite(T x) {
  return x - x == T(0);  // false for NaN and +-inf
}

// The smallest eigenvalue of the symmetric m (destroyed) from below: cyclic Jacobi sweeps in
// double, then Weyl's bound for what they leave off the diagonal, less 1e-12 tr (tr = trace of
// m, >= 0) for their rounding.
NEUSDF_HD double jacobi_lambda_min(double m[3][3], double tr) {
  for (int sweep = 0; sweep < 12; ++sweep) {
    const double off = m[0][1] * m[0][1] + m[0][2] * m[0][2] + m[1][2] * m[1][2];
    if (!(off > 1e-36 * tr * tr)) break;
    for (int a = 0; a < 2; ++a) {
      for (int b = a + 1; b < 3; ++b) {
        const double apq = m[a][b];
        if (apq == 0) continue;
        const double theta = (m[b][b] - m[a][a]) / (2 * apq);
        const double t = theta > 1e150 || theta < -1e150
                             ? 0.5 / theta
                             : (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
        const double c = 1 / sqrt(t * t + 1), sn = t * c;
        m[a][a] -= t * apq;
        m[b][b] += t * apq;
        m[a][b] = m[b][a] = 0;
        for (int r = 0; r < 3; ++r) {
          if (r == a || r == b) continue;
          const double ra = m[r][a], rb = m[r][b];
          m[r][a] = m[a][r] = c * ra - sn * rb;
          m[r][b] = m[b][r] = sn * ra + c * rb;
        }
      }
    }
  }
  const double off = m[0][1] * m[0][1] + m[0][2] * m[0][2] + m[1][2] * m[1][2];
  return fmin(m[0][0], fmin(m[1][1], m[2][2])) - sqrt(2 * off) - 1e-12 * tr;
}

// Coefficient lam with D >= lam |q - p|^2 for the distance D that pair_distance computes in
// precision T, for every q: a lower bound on the smallest eigenvalue of M = R^T diag(s) R,
// reduced by the rounding error of pair_distance. With gamma = 16 eps(T), the computed u_i is
// within gamma |R_i| |d| of the exact one, so D_computed >= (1 - gamma) (lam - 2 gamma
// sqrt(lam tr M)) |d|^2. Returns 0 when no positive bound survives, and -1 for a point that the
// grid cannot bound at all (non-finite inputs, a precision <= 0, or a bound beyond T's range).
//
// The bound on the smallest eigenvalue comes first from the rows' Gram matrix G = R R^T:
// |R x|^2 >= lam_min(G) |x|^2, so lam_min(M) >= min(s) lam_min(G), and Gershgorin's discs give
// lam_min(G) >= min_i (G_ii - sum_{k != i} |G_ik|): a few products, and tight to rounding where
// the rows are orthogonal (rotations, a scaled rotation). It is taken when it is within 1e-3 of
// an upper bound on lam_min(M), the Rayleigh quotient of M at row j of R (s_j the smallest
// precision), which is min(s) itself for orthonormal rows. Otherwise (axes far from orthogonal)
// Jacobi on M decides, the larger of the two bounds kept. With Jacobi for every point the
// tile build's per-tile phase took 1.8-2.4x as long (docs/op.md, "The tile build's phases").
template <typename T>
NEUSDF_HD T point_lambda(const T p[3], const T s[3], const T R[9]) {
  for (int i = 0; i < 3; ++i) {
    if (!is_finite(p[i]) || !is_finite(s[i]) || !(s[i] > T(0))) return T(-1);
  }
  for (int i = 0; i < 9; ++i) {
    if (!is_finite(R[i])) return T(-1);
  }
  double G[3][3];  // G_ik = R_i . R_k (for float inputs the products are exact in double)
  for (int i = 0; i < 3; ++i) {
    for (int k = 0; k < 3; ++k) {
      double sum = 0;
      for (int c = 0; c < 3; ++c) {
        sum += static_cast<double>(R[3 * i + c]) * static_cast<double>(R[3 * k + c]);
      }
      G[i][k] = sum;
    }
  }
  // the trace of M (sum_i s_i G_ii); j the smallest precision's axis, G's column j and s_j by
  // selects (a run-time index would put G in local memory on the GPU)
  double tr = 0;
  for (int i = 0; i < 3; ++i) tr += static_cast<double>(s[i]) * G[i][i];
  if (!(tr < 1e300)) return T(-1);
  const int j = s[1] < s[0] ? (s[2] < s[1] ? 2 : 1) : (s[2] < s[0] ? 2 : 0);
  double gj[3];
  for (int i = 0; i < 3; ++i) gj[i] = j == 0 ? G[i][0] : (j == 1 ? G[i][1] : G[i][2]);
  const double s_min = static_cast<double>(j == 0 ? s[0] : (j == 1 ? s[1] : s[2]));
  const double g_jj = j == 0 ? gj[0] : (j == 1 ? gj[1] : gj[2]);
  double gram_min = G[0][0] - fabs(G[0][1]) - fabs(G[0][2]);
  gram_min = fmin(gram_min, G[1][1] - fabs(G[1][0]) - fabs(G[1][2]));
  gram_min = fmin(gram_min, G[2][2] - fabs(G[2][0]) - fabs(G[2][1]));
  // The rounding of G and of this expression is below 1e-14 min(s) max_i G_ii <= 1e-14 tr.
  double lam = s_min * gram_min - 1e-12 * tr;
  double upper = 0;
  for (int i = 0; i < 3; ++i) upper += static_cast<double>(s[i]) * gj[i] * gj[i];
  upper /= g_jj;  // NaN for a zero row j: Jacobi decides
  if (!(lam >= (1 - 1e-3) * upper)) {
    double m[3][3];
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) {
        double sum = 0;
        for (int i = 0; i < 3; ++i) {
          sum += static_cast<double>(s[i]) * static_cast<double>(R[3 * i + a]) *
                 static_cast<double>(R[3 * i + b]);
        }
        m[a][b] = sum;
      }
    }
    lam = fmax(lam, jacobi_lambda_min(m, tr));
  }
  if (!(lam > 0)) return T(0);
  const double gamma = 16 * Eps<T>::value;
  lam = (1 - gamma) * (lam - 2 * gamma * sqrt(lam * tr));
  if (!(lam > 0)) return T(0);
  lam *= 1 - 4 * Eps<T>::value;  // converting to T can then not round above the bound
  if (!(lam < static_cast<double>(FiniteMax<T>::value))) return T(-1);
  return static_cast<T>(lam);
}

// Geometry of one batch's grid: G^3 cells of size h over the box [lo, lo + G h]. slack covers
// the rounding of cell assignment and cell boundaries (all in precision T).
template <typename T>
struct GridGeom {
  T lo[3], h[3], inv_h[3], slack[3];
  int G;
};

// The grid over the box [lo, hi] of the grid's points (lo > hi, or NaN, when there are none).
// A flat axis gets at least 1e-3 of the largest extent.
template <typename T>
NEUSDF_HD GridGeom<T> make_grid_geom(const T lo[3], const T hi[3], int G) {
  GridGeom<T> g;
  g.G = G;
  bool empty = false;
  T emax = 0;
  for (int j = 0; j < 3; ++j) {
    if (!(lo[j] <= hi[j]) || !is_finite(lo[j]) || !is_finite(hi[j])) empty = true;
  }
  for (int j = 0; j < 3; ++j) {
    if (!empty && hi[j] - lo[j] > emax) emax = hi[j] - lo[j];
  }
  const T min_extent = emax * T(1e-3) > T(1e-20) ? emax * T(1e-3) : T(1e-20);
  for (int j = 0; j < 3; ++j) {
    g.lo[j] = empty ? T(0) : lo[j];
    const T e = empty ? T(1) : (hi[j] - lo[j] > min_extent ? hi[j] - lo[j] : min_extent);
    g.h[j] = e / T(G);
    g.inv_h[j] = T(G) / e;
    const T mag = (g.lo[j] < 0 ? -g.lo[j] : g.lo[j]) + e;
    g.slack[j] = T(64 * Eps<T>::value) * mag;
  }
  return g;
}

// Cell coordinate of x along axis j, clamped to [0, G - 1] (NaN gives 0).
template <typename T>
NEUSDF_HD int cell_coord(T x, const GridGeom<T>& g, int j) {
  const T c = (x - g.lo[j]) * g.inv_h[j];
  return c >= T(g.G - 1) ? g.G - 1 : (c > T(0) ? static_cast<int>(c) : 0);
}

NEUSDF_HD int64_t cell_linear(const int c[3], int G) {
  return (static_cast<int64_t>(c[2]) * G + c[1]) * G + c[0];
}

// max(0, x - slack)^2 for a gap x along one axis (NaN gives 0).
template <typename T>
NEUSDF_HD T gap_squared(T x, T slack) {
  const T y = x - slack;
  return y > T(0) ? y * y : T(0);
}

// Lower bound on |q - p|^2 for every point p of cell c.
template <typename T>
NEUSDF_HD T cell_gap2(const T q[3], const GridGeom<T>& g, const int c[3]) {
  T sum = 0;
  for (int j = 0; j < 3; ++j) {
    const T lo = g.lo[j] + T(c[j]) * g.h[j];
    const T hi = lo + g.h[j];
    sum += gap_squared(lo - q[j] > q[j] - hi ? lo - q[j] : q[j] - hi, g.slack[j]);
  }
  return sum;
}

// Lower bound on |q - p|^2 for every point p in a cell at Chebyshev distance >= r >= 1 from
// the query's (clamped) cell cq; negative when there is no such cell. Such a cell lies, along
// some axis j, at least r cells away from cq; every point is also at least the distance of q
// to the grid box away along every axis.
template <typename T>
NEUSDF_HD T ring_gap2(const T q[3], const GridGeom<T>& g, const int cq[3], int r) {
  T out2[3];
  for (int j = 0; j < 3; ++j) {
    const T lo = g.lo[j], hi = g.lo[j] + T(g.G) * g.h[j];
    out2[j] = gap_squared(lo - q[j] > q[j] - hi ? lo - q[j] : q[j] - hi, g.slack[j]);
  }
  T best = 0;
  bool any = false;
  for (int j = 0; j < 3; ++j) {
    const T others = out2[(j + 1) % 3] + out2[(j + 2) % 3];
    if (cq[j] - r >= 0) {  // cells at c_j <= cq_j - r end at lo + (cq_j - r + 1) h
      T g2 = gap_squared(q[j] - (g.lo[j] + T(cq[j] - r + 1) * g.h[j]), g.slack[j]);
      g2 = (g2 > out2[j] ? g2 : out2[j]) + others;
      best = any && best < g2 ? best : g2;
      any = true;
    }
    if (cq[j] + r <= g.G - 1) {  // cells at c_j >= cq_j + r start at lo + (cq_j + r) h
      T g2 = gap_squared(g.lo[j] + T(cq[j] + r) * g.h[j] - q[j], g.slack[j]);
      g2 = (g2 > out2[j] ? g2 : out2[j]) + others;
      best = any && best < g2 ? best : g2;
      any = true;
    }
  }
  return any ? best : T(-1);
}

// A squared gap x that overflowed (+inf, or NaN from one) as the largest finite value: the gap
// is at least that large, but not infinite, and lam * inf would claim a bound above every
// finite distance, which a small lam (a flat Gaussian far away) does not give.
template <typename T>
NEUSDF_HD T overflowed_as_finite(T x) {
  return x < FiniteMax<T>::value ? x : static_cast<T>(FiniteMax<T>::value);
}

// Search key of the lower bound lam * gap2 of D (0 when lam or gap2 is 0), shaved by a few
// rounding errors. A cell or ring may be skipped only when this key is strictly above the
// current K-th best key: on equality a point with a lower index could still come first.
// An overflowed gap2 counts as the largest finite value (overflowed_as_finite).
template <typename T>
NEUSDF_HD T bound_key(T lam, T gap2) {
  gap2 = overflowed_as_finite(gap2);
  const T b = lam > T(0) && gap2 > T(0) ? lam * gap2 * T(1 - 16 * Eps<T>::value) : T(0);
  return search_key(b);
}

// The tile search's per-point prefilter: a lower bound on one point's key, cheaper than the key
// (9 FP32 operations after one load, against 18 after four), that spares the exact distance
// for the points no query of a warp can take. w = point_bound_weight(lam) for the point's
// lam > 0 (point_lambda); d = q - p rounded as pair_distance rounds it, so that
// D_computed >= lam |d|^2 holds (point_lambda), and w |d|^2 rounded stays below lam |d|^2 (w is
// shaved by 16 eps, the few roundings here cost at most 5). An overflowed |d|^2 counts as the
// largest finite value (overflowed_as_finite); a NaN d gives the key of a NaN distance, the
// largest finite value, which is no lower bound problem since the exact key is that value too.
template <typename T>
NEUSDF_HD T point_bound_weight(T lam) {
  return lam * T(1 - 16 * Eps<T>::value);
}

template <typename T>
NEUSDF_HD T point_bound_key(const T q[3], const T p[3], T w) {
  const T d0 = q[0] - p[0], d1 = q[1] - p[1], d2 = q[2] - p[2];
  const T g2 = overflowed_as_finite(mul_add(d2, d2, mul_add(d1, d1, d0 * d0)));
  return search_key(w * g2);
}


// ------------------------------------------------------------------------------ tiles
//
// The tile search (method "tile"; docs/op.md, "The tile search"): queries and points sorted
// along one Morton curve, groups of consecutive queries walking the points in tiles of 32
// consecutive points, a tile skipped when every query's bound on it is above that query's
// current N-th best key. These pieces are shared by both devices; the CPU runs the 32 queries
// of a group in lockstep, the CUDA kernel gives a warp 16 or 8 queries (2 or 4 lanes each).

constexpr int kTilePoints = 32;  // points per tile (one per lane when a warp stages a tile)
constexpr int kTileQueries = 32;  // queries walking the tiles together on the CPU
constexpr int kTileHome = 8;      // tiles scanned first, around the queries' place
constexpr int kMortonBits = 8;    // per axis

// Bounding box and smallest lam (0 when some point has no bound) of one tile's points.
template <typename T>
struct alignas(16) TileBox {
  T lo[3];
  T hi[3];
  T lam;
  T pad;
};

// Morton code (3 kMortonBits bits) of x in the box [lo, hi] (clamped per axis; NaN and an
// empty box give 0).
template <typename T>
NEUSDF_HD int64_t morton_code(const T x[3], const T* lo, const T* hi) {
  const T top = static_cast<T>((1 << kMortonBits) - 1);
  unsigned c[3];
  for (int a = 0; a < 3; ++a) {
    const T e = hi[a] - lo[a];
    const T f = e > T(0) ? (x[a] - lo[a]) / e * top : T(0);
    c[a] = f >= top ? (1u << kMortonBits) - 1 : (f > T(0) ? static_cast<unsigned>(f) : 0u);
  }
  int64_t code = 0;
  for (int bit = 0; bit < kMortonBits; ++bit) {
    for (int a = 0; a < 3; ++a) code |= static_cast<int64_t>((c[a] >> bit) & 1u) << (3 * bit + a);
  }
  return code;
}

// Adds a point to a tile's box and lam (start from empty_tile_box).
template <typename T>
NEUSDF_HD void extend_tile_box(TileBox<T>& box, const T p[3], T lam) {
  for (int a = 0; a < 3; ++a) {  // a NaN coordinate changes nothing (its lam is -1)
    box.lo[a] = p[a] < box.lo[a] ? p[a] : box.lo[a];
    box.hi[a] = p[a] > box.hi[a] ? p[a] : box.hi[a];
  }
  box.lam = lam < box.lam ? lam : box.lam;  // -1 or 0 (no bound) stays below every bound
}

// Extends box to the union of itself and other (extend_tile_box's rules: a NaN bound changes
// nothing, lam is the smaller).
template <typename T>
NEUSDF_HD void union_tile_box(TileBox<T>& box, const TileBox<T>& other) {
  for (int a = 0; a < 3; ++a) {
    box.lo[a] = other.lo[a] < box.lo[a] ? other.lo[a] : box.lo[a];
    box.hi[a] = other.hi[a] > box.hi[a] ? other.hi[a] : box.hi[a];
  }
  box.lam = other.lam < box.lam ? other.lam : box.lam;
}

template <typename T>
NEUSDF_HD TileBox<T> empty_tile_box() {
  TileBox<T> box;
  for (int a = 0; a < 3; ++a) {
    box.lo[a] = static_cast<T>(INFINITY);
    box.hi[a] = -static_cast<T>(INFINITY);
  }
  box.lam = static_cast<T>(INFINITY);
  box.pad = 0;
  return box;
}

template <typename T>
NEUSDF_HD T magnitude(T x) {
  return x < T(0) ? -x : x;
}

// Search key of a lower bound on D for every point of the tile, from the squared gap between
// q and the tile's box, shaved for the rounding of the gaps (NaN or infinite q: 0). A tile
// holding a point without a bound gets -inf: it is never skipped, whatever the keys (with a
// negative precision, which only the raw operator lets through, keys can be negative).
template <typename T>
NEUSDF_HD T tile_bound_key(const T q[3], const TileBox<T>& box) {
  if (!(box.lam > T(0))) return -static_cast<T>(INFINITY);
  T gap2 = 0;
  for (int a = 0; a < 3; ++a) {
    const T below = box.lo[a] - q[a], above = q[a] - box.hi[a];
    const T slack =
        T(64 * Eps<T>::value) * (magnitude(q[a]) + magnitude(box.lo[a]) + magnitude(box.hi[a]));
    gap2 += gap_squared(below > above ? below : above, slack);
  }
  return bound_key(box.lam, gap2);
}

// A lower bound on tile_bound_key(q, box) for every q in the box [qlo, qhi] of a group's
// finite queries, so that one test per tile can skip it for the whole group (the per-query
// tests then run only on the tiles this one keeps). Each step of tile_bound_key is monotone in
// q's gap to the box and in the slack, and this takes the smallest gap and the largest slack
// of any q in [qlo, qhi]; the key is shaved by 8 more eps for the two computations' possibly
// different contraction of multiply-adds.
template <typename T>
NEUSDF_HD T group_tile_bound_key(const T qlo[3], const T qhi[3], const TileBox<T>& box) {
  if (!(box.lam > T(0))) return -static_cast<T>(INFINITY);
  T gap2 = 0;
  for (int a = 0; a < 3; ++a) {
    const T below = box.lo[a] - qhi[a], above = qlo[a] - box.hi[a];
    const T mq = magnitude(qlo[a]) > magnitude(qhi[a]) ? magnitude(qlo[a]) : magnitude(qhi[a]);
    const T slack = T(64 * Eps<T>::value) * (mq + magnitude(box.lo[a]) + magnitude(box.hi[a]));
    gap2 += gap_squared(below > above ? below : above, slack);
  }
  return bound_key(box.lam, gap2) * T(1 - 8 * Eps<T>::value);
}

// The first of the kTileHome tiles scanned first, for queries that fall at position pos of
// the points' Morton order.
NEUSDF_HD int home_tile(int64_t pos, int tiles) {
  const int home = tiles < kTileHome ? tiles : kTileHome;
  const int first = static_cast<int>(pos / kTilePoints) - home / 2;
  const int last_first = tiles - home;
  return first < 0 ? 0 : (first > last_first ? last_first : first);
}

// Where the home tiles' scan starts: the offset in [0, home) of the tile that holds position
// pos (where the queries fall among the points). The home tiles are scanned from that tile
// upward, then from first upward: the nearest points first tighten the gates before the rest
// are bounded, so fewer points get an exact key and fewer enter a list (in the index order,
// the scan began 4 tiles, 128 points, away; docs/op.md, "The home tiles' order").
NEUSDF_HD int home_start(int64_t pos, int first, int home) {
  const int at = static_cast<int>(pos / kTilePoints) - first;
  return at < 0 ? 0 : (at >= home ? home - 1 : at);
}

// Chunk (of 32 tiles) visited at step i after the home tiles: outward from the chunk hc that
// holds the home tiles' first, alternating above and below (hc, hc + 1, hc - 1, hc + 2, ...),
// then the longer side's rest; a permutation of [0, chunks). Nearer tiles first tighten the
// gates sooner: against the chunks in index order, 1.6x faster at P = 65536 on a sphere
// (docs/op.md, "The build in one launch, and the chunks' order").
NEUSDF_HD int outward_chunk(int i, int hc, int chunks) {
  const int below = hc, above = chunks - 1 - hc;
  const int near = below < above ? below : above;
  if (i <= 2 * near) return (i & 1) ? hc + (i + 1) / 2 : hc - (i + 1) / 2;
  return above > below ? hc + i - near : hc - (i - near);
}

}  // namespace neusdf
