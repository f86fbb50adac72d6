// CPU kernels of the anisotropic kNN search (contract of knn_search in knn_aggregate.h).
//
// Brute force, in parallel over queries (at::parallel_for): all P keys, nth_element, then a
// sort of the first K by (key, index). Grid (knn_grid.h): per batch, the grid is built
// serially (O(P + G^3)), then queries run in parallel, each keeping its K best in a heap.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"
#include "knn_grid.h"

namespace neusdf {
namespace {

constexpr int64_t kQueryGrain = 64;  // queries per at::parallel_for task

template <typename T>
void search_brute_force(const T* q, const T* p, const T* sigma, const T* R, const ProblemSize& n,
                        int64_t* idx) {
  at::parallel_for(0, n.B * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<T, int64_t>> cand(n.P);
    const auto before = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
      return comes_before(a.first, a.second, b.first, b.second);
    };
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / n.Q;
      for (int64_t j = 0; j < n.P; ++j) {
        const int64_t pj = b * n.P + j;
        T d[3], u[3];
        cand[j] = {search_key(pair_distance(q + 3 * bq, p + 3 * pj, sigma + 3 * pj, R + 9 * pj,
                                            d, u)),
                   j};
      }
      std::nth_element(cand.begin(), cand.begin() + (n.K - 1), cand.end(), before);
      std::sort(cand.begin(), cand.begin() + n.K, before);
      for (int64_t k = 0; k < n.K; ++k) idx[bq * n.K + k] = cand[k].second;
    }
  });
}

// One batch's grid: points sorted by cell with a counting sort. Bucket c < G^3 is cell c,
// bucket G^3 holds the points the bound cannot cover (scanned by every query).
template <typename T>
struct CpuGrid {
  GridGeom<T> geom;
  int64_t cells;                   // G^3
  std::vector<int64_t> start;      // cells + 2 bucket offsets into order
  std::vector<int64_t> order;      // point indices, bucket by bucket
  std::vector<T> cell_lam;         // min lam over each cell's points
  T lam_min;                       // min lam over all points in cells
};

template <typename T>
CpuGrid<T> build_grid(const T* p, const T* sigma, const T* R, int64_t P) {
  CpuGrid<T> grid;
  const int G = grid_cells_per_axis(P);
  grid.cells = static_cast<int64_t>(G) * G * G;
  std::vector<T> lam(P);
  for (int64_t j = 0; j < P; ++j) lam[j] = point_lambda(p + 3 * j, sigma + 3 * j, R + 9 * j);
  // Points with lam < kLamFloorOfMedian * median (or no bound, lam = -1) go to the last bucket;
  // the median of a sample (knn_grid.h).
  const int64_t stride = lam_sample_stride(P);
  std::vector<T> sample;
  for (int64_t j = 0; j < P; j += stride) sample.push_back(lam[j]);
  const size_t mid = sample.size() / 2;
  std::nth_element(sample.begin(), sample.begin() + mid, sample.end());
  const T median = sample[mid];
  const T floor = median > T(0) ? static_cast<T>(median * kLamFloorOfMedian) : T(0);
  const auto in_cells = [&](int64_t j) { return lam[j] >= 0 && lam[j] >= floor && lam[j] > 0; };
  T lo[3], hi[3];
  for (int c = 0; c < 3; ++c) {
    lo[c] = std::numeric_limits<T>::infinity();
    hi[c] = -std::numeric_limits<T>::infinity();
  }
  for (int64_t j = 0; j < P; ++j) {
    if (!in_cells(j)) continue;
    for (int c = 0; c < 3; ++c) {
      lo[c] = std::min(lo[c], p[3 * j + c]);
      hi[c] = std::max(hi[c], p[3 * j + c]);
    }
  }
  grid.geom = make_grid_geom(lo, hi, G);
  std::vector<int64_t> bucket(P);
  grid.start.assign(grid.cells + 2, 0);
  for (int64_t j = 0; j < P; ++j) {
    int c[3];
    for (int a = 0; a < 3; ++a) c[a] = cell_coord(p[3 * j + a], grid.geom, a);
    bucket[j] = in_cells(j) ? cell_linear(c, G) : grid.cells;
    ++grid.start[bucket[j] + 1];
  }
  for (int64_t c = 0; c <= grid.cells; ++c) grid.start[c + 1] += grid.start[c];
  grid.order.resize(P);
  std::vector<int64_t> cursor(grid.start.begin(), grid.start.end() - 1);
  for (int64_t j = 0; j < P; ++j) grid.order[cursor[bucket[j]]++] = j;
  grid.cell_lam.assign(grid.cells, std::numeric_limits<T>::infinity());
  grid.lam_min = std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < P; ++j) {
    if (bucket[j] == grid.cells) continue;
    grid.cell_lam[bucket[j]] = std::min(grid.cell_lam[bucket[j]], lam[j]);
    grid.lam_min = std::min(grid.lam_min, lam[j]);
  }
  return grid;
}

// The K best (key, index) pairs seen so far: a max-heap under comes_before (worst on top).
template <typename T>
class BestK {
 public:
  explicit BestK(int64_t K) : K_(K) { heap_.reserve(K); }

  void offer(T key, int64_t j) {
    if (static_cast<int64_t>(heap_.size()) < K_) {
      heap_.emplace_back(key, j);
      std::push_heap(heap_.begin(), heap_.end(), before);
    } else if (before({key, j}, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), before);
      heap_.back() = {key, j};
      std::push_heap(heap_.begin(), heap_.end(), before);
    }
  }

  // The key a candidate must not exceed to matter: +inf until K are held.
  T kth_key() const {
    return static_cast<int64_t>(heap_.size()) < K_ ? std::numeric_limits<T>::infinity()
                                                  : heap_.front().first;
  }

  void write_sorted(int64_t* out) {
    std::sort_heap(heap_.begin(), heap_.end(), before);
    for (int64_t k = 0; k < K_; ++k) out[k] = heap_[k].second;
  }

 private:
  static bool before(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return comes_before(a.first, a.second, b.first, b.second);
  }
  int64_t K_;
  std::vector<std::pair<T, int64_t>> heap_;
};

// The K nearest points of query qv in one batch's grid (p, sigma, R: that batch's rows).
template <typename T>
void grid_query(const CpuGrid<T>& grid, const T* qv, const T* p, const T* sigma, const T* R,
                int64_t K, int64_t* out) {
  BestK<T> best(K);
  const auto scan_bucket = [&](int64_t bucket) {
    for (int64_t x = grid.start[bucket]; x < grid.start[bucket + 1]; ++x) {
      const int64_t j = grid.order[x];
      T d[3], u[3];
      best.offer(search_key(pair_distance(qv, p + 3 * j, sigma + 3 * j, R + 9 * j, d, u)), j);
    }
  };
  scan_bucket(grid.cells);  // points outside the bound: always scanned
  const GridGeom<T>& g = grid.geom;
  if (!(is_finite(qv[0]) && is_finite(qv[1]) && is_finite(qv[2]))) {
    for (int64_t c = 0; c < grid.cells; ++c) scan_bucket(c);  // no bound holds: scan all
    best.write_sorted(out);
    return;
  }
  int cq[3];
  for (int a = 0; a < 3; ++a) cq[a] = cell_coord(qv[a], g, a);
  int rmax = 0;
  for (int a = 0; a < 3; ++a) rmax = std::max({rmax, cq[a], g.G - 1 - cq[a]});
  for (int r = 0; r <= rmax; ++r) {
    if (r > 0) {
      const T gap2 = ring_gap2(qv, g, cq, r);
      if (gap2 < 0 || bound_key(grid.lam_min, gap2) > best.kth_key()) break;
    }
    // The cells at Chebyshev distance exactly r from cq, clipped to the grid.
    for (int z = std::max(0, cq[2] - r); z <= std::min(g.G - 1, cq[2] + r); ++z) {
      for (int y = std::max(0, cq[1] - r); y <= std::min(g.G - 1, cq[1] + r); ++y) {
        const bool shell = std::abs(z - cq[2]) == r || std::abs(y - cq[1]) == r;
        const int step = shell || r == 0 ? 1 : 2 * r;
        for (int x = cq[0] - r; x <= cq[0] + r; x += step) {
          if (x < 0 || x >= g.G) continue;
          const int c[3] = {x, y, z};
          const int64_t bucket = cell_linear(c, g.G);
          if (grid.start[bucket] == grid.start[bucket + 1]) continue;
          if (bound_key(grid.cell_lam[bucket], cell_gap2(qv, g, c)) > best.kth_key()) continue;
          scan_bucket(bucket);
        }
      }
    }
  }
  best.write_sorted(out);
}

template <typename T>
void search_grid(const T* q, const T* p, const T* sigma, const T* R, const ProblemSize& n,
                 int64_t* idx) {
  for (int64_t b = 0; b < n.B; ++b) {
    const T* pb = p + 3 * b * n.P;
    const T* sb = sigma + 3 * b * n.P;
    const T* Rb = R + 9 * b * n.P;
    const CpuGrid<T> grid = build_grid(pb, sb, Rb, n.P);
    at::parallel_for(b * n.Q, (b + 1) * n.Q, kQueryGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bq = begin; bq < end; ++bq) {
        grid_query(grid, q + 3 * bq, pb, sb, Rb, n.K, idx + bq * n.K);
      }
    });
  }
}

// The tile search (knn_grid.h, "tiles"): each group of 32 queries consecutive in Morton order
// runs in lockstep through the home tiles and then every other tile (the chunks of 32 tiles
// outward from the home tiles, as the CUDA kernel visits them), skipping a tile when no
// query's bound on it reaches its N-th key (the CUDA kernel walks groups of 16 or 8 queries, 2
// or 4 lanes each, in Morton cell order, and tests chunks of 32 tiles first; the result is the
// same, exact). It is the CUDA walk's check on the CPU (the order, the bounds, the padding of
// the last tile) more than a fast path: "auto" takes the grid on the CPU.
template <typename T>
void search_tiles(const T* q, const T* p, const T* sigma, const T* R, const ProblemSize& n,
                  int64_t* idx) {
  int N = 1;
  while (N < n.K) N *= 2;  // the list length of the CUDA kernel, which gates on its last key
  const int tiles = static_cast<int>((n.P + kTilePoints - 1) / kTilePoints);
  for (int64_t b = 0; b < n.B; ++b) {
    const T* pb = p + 3 * b * n.P;
    const T* sb = sigma + 3 * b * n.P;
    const T* Rb = R + 9 * b * n.P;
    const T* qb = q + 3 * b * n.Q;
    std::vector<T> lam(n.P);
    T lo[3], hi[3];
    for (int a = 0; a < 3; ++a) {
      lo[a] = std::numeric_limits<T>::infinity();
      hi[a] = -std::numeric_limits<T>::infinity();
    }
    for (int64_t j = 0; j < n.P; ++j) {
      lam[j] = point_lambda(pb + 3 * j, sb + 3 * j, Rb + 9 * j);
      const T* v = pb + 3 * j;
      if (!(is_finite(v[0]) && is_finite(v[1]) && is_finite(v[2]))) continue;
      for (int a = 0; a < 3; ++a) {
        lo[a] = std::min(lo[a], v[a]);
        hi[a] = std::max(hi[a], v[a]);
      }
    }
    // Morton order of the points and of the queries (the box only orders)
    const auto sorted = [&](const T* xyz, int64_t count) {
      std::vector<std::pair<int64_t, int64_t>> code(count);
      for (int64_t i = 0; i < count; ++i) code[i] = {morton_code(xyz + 3 * i, lo, hi), i};
      std::sort(code.begin(), code.end());
      return code;
    };
    const std::vector<std::pair<int64_t, int64_t>> pcode = sorted(pb, n.P), qcode = sorted(qb, n.Q);
    std::vector<TileBox<T>> boxes(tiles, empty_tile_box<T>());
    for (int64_t s = 0; s < n.P; ++s) {
      const int64_t j = pcode[s].second;
      extend_tile_box(boxes[s / kTilePoints], pb + 3 * j, lam[j]);
    }
    // the boxes of the chunks of 32 tiles, which the CUDA kernel tests before their tiles' boxes
    const int chunks = (tiles + kTilePoints - 1) / kTilePoints;
    std::vector<TileBox<T>> chunk_boxes(chunks, empty_tile_box<T>());
    for (int t = 0; t < tiles; ++t) union_tile_box(chunk_boxes[t / kTilePoints], boxes[t]);
    const int home = tiles < kTileHome ? tiles : kTileHome;
    const int64_t groups = (n.Q + kTileQueries - 1) / kTileQueries;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> key(kTileQueries * N);
      std::vector<int64_t> ind(kTileQueries * N);
      for (int64_t g = begin; g < end; ++g) {
        std::fill(key.begin(), key.end(), std::numeric_limits<T>::infinity());
        std::fill(ind.begin(), ind.end(), std::numeric_limits<int64_t>::max());
        const int64_t first_query = g * kTileQueries;
        const int64_t lanes = std::min<int64_t>(kTileQueries, n.Q - first_query);
        const int64_t code = qcode[std::min(first_query + kTileQueries / 2, n.Q - 1)].first;
        const int64_t pos =
            std::lower_bound(pcode.begin(), pcode.end(), std::make_pair(code, int64_t(0))) -
            pcode.begin();
        const int first = home_tile(pos, tiles);
        // the box of the group's queries, for the one test per tile that the CUDA kernel runs
        // before the per-query tests (valid only when every query is finite)
        TileBox<T> group = empty_tile_box<T>();
        bool group_test = true;
        for (int64_t l = 0; l < lanes; ++l) {
          const T* qv = qb + 3 * qcode[first_query + l].second;
          group_test = group_test && is_finite(qv[0]) && is_finite(qv[1]) && is_finite(qv[2]);
          extend_tile_box(group, qv, T(0));
        }
        // One tile for the whole group (after the home tiles, chunk_test: the chunk's box
        // first, as the CUDA kernel does; it skips nothing the tile's own test keeps, unless a
        // bound's rounding is not monotone).
        const auto visit = [&](int t, bool chunk_test) {
          if (group_test) {
            T widest = -std::numeric_limits<T>::infinity();
            for (int64_t l = 0; l < lanes; ++l) widest = std::max(widest, key[l * N + N - 1]);
            if (chunk_test &&
                group_tile_bound_key(group.lo, group.hi, chunk_boxes[t / kTilePoints]) > widest) {
              return;
            }
            if (group_tile_bound_key(group.lo, group.hi, boxes[t]) > widest) return;
          }
          bool need = false;
          for (int64_t l = 0; l < lanes; ++l) {
            const T* qv = qb + 3 * qcode[first_query + l].second;
            need = need || !(tile_bound_key(qv, boxes[t]) > key[l * N + N - 1]);
          }
          if (!need) return;
          for (int64_t l = 0; l < lanes; ++l) {
            const T* qv = qb + 3 * qcode[first_query + l].second;
            T* kl = key.data() + l * N;
            int64_t* il = ind.data() + l * N;
            for (int x = 0; x < kTilePoints; ++x) {
              const int64_t slot = static_cast<int64_t>(t) * kTilePoints + x;
              T k;
              int64_t j;
              if (slot < n.P) {
                j = pcode[slot].second;
                // the CUDA kernel's prefilter, here per query
                if (boxes[t].lam > T(0) &&
                    point_bound_key(qv, pb + 3 * j, point_bound_weight(lam[j])) > kl[N - 1]) {
                  continue;
                }
                T d[3], u[3];
                k = search_key(pair_distance(qv, pb + 3 * j, sb + 3 * j, Rb + 9 * j, d, u));
              } else {  // the CUDA kernel's padding record: the largest key, past every index
                j = n.P + x;
                k = search_key(std::numeric_limits<T>::quiet_NaN());
              }
              if (!comes_before(k, j, kl[N - 1], il[N - 1])) continue;
              int s = N - 1;
              for (; s > 0 && comes_before(k, j, kl[s - 1], il[s - 1]); --s) {
                kl[s] = kl[s - 1];
                il[s] = il[s - 1];
              }
              kl[s] = k;
              il[s] = j;
            }
          }
        };
        // the CUDA kernel's order: the home tiles from home_start, wrapping, then the chunks
        // outward (outward_chunk)
        const int start = home_start(pos, first, home);
        for (int i = 0; i < home; ++i) visit(first + (start + i) % home, false);
        for (int i = 0; i < chunks; ++i) {
          const int c = outward_chunk(i, first / kTilePoints, chunks);
          for (int t = c * kTilePoints; t < std::min(tiles, (c + 1) * kTilePoints); ++t) {
            if (t < first || t >= first + home) visit(t, true);
          }
        }
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t bq = b * n.Q + qcode[first_query + l].second;
          for (int64_t k = 0; k < n.K; ++k) idx[bq * n.K + k] = ind[l * N + k];
        }
      }
    });
  }
}

at::Tensor knn_search_cpu(const at::Tensor& q_in, const at::Tensor& p_in,
                          const std::optional<at::Tensor>& sigma_opt,
                          const std::optional<at::Tensor>& R_opt, int64_t K,
                          c10::string_view method) {
  auto [sigma_in, R_in] = search_metric(sigma_opt, R_opt);
  const ProblemSize n = check_points(q_in, p_in, sigma_in, R_in, K);
  const SearchMethod how =
      choose_search_method(method, n, /*cuda=*/false, /*euclidean=*/!sigma_in.defined());
  at::Tensor idx = at::empty({n.B, n.Q, K}, q_in.options().dtype(at::kLong));
  if (n.B * n.Q == 0) return idx;
  // the Euclidean metric runs the general kernels on the identity (bit for bit the same keys)
  if (!sigma_in.defined()) std::tie(sigma_in, R_in) = euclidean_metric(p_in);
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), sigma = sigma_in.contiguous(),
                   R = R_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_search_cpu", [&] {
    using T = scalar_t;
    const auto search = how == SearchMethod::kGrid   ? search_grid<T>
                        : how == SearchMethod::kTile ? search_tiles<T>
                                                     : search_brute_force<T>;
    search(q.data_ptr<T>(), p.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(), n,
           idx.data_ptr<int64_t>());
  });
  return idx;
}

// The CPU kernels visit the queries in any order at the same cost: the identity.
std::tuple<at::Tensor, at::Tensor> knn_search_ordered_cpu(
    const at::Tensor& q, const at::Tensor& p, const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& R, int64_t K, c10::string_view method) {
  at::Tensor idx = knn_search_cpu(q, p, sigma, R, K, method);
  return {idx, at::arange(q.size(0) * q.size(1), idx.options())};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CPU, m) {
  m.impl("knn_search", &neusdf::knn_search_cpu);
  m.impl("knn_search_ordered", &neusdf::knn_search_ordered_cpu);
}
