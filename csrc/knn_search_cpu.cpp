// CPU kernel of the anisotropic kNN search (contract of knn_search in knn_aggregate.h).
//
// Brute force, in parallel over queries (at::parallel_for): all P keys, nth_element, then a
// sort of the first K by (key, index).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "knn_aggregate.h"
#include "knn_aggregate_math.h"

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

at::Tensor knn_search_cpu(const at::Tensor& q_in, const at::Tensor& p_in,
                          const at::Tensor& sigma_in, const at::Tensor& R_in, int64_t K) {
  const ProblemSize n = check_points(q_in, p_in, sigma_in, R_in, K);
  at::Tensor idx = at::empty({n.B, n.Q, K}, q_in.options().dtype(at::kLong));
  if (n.B * n.Q == 0) return idx;
  const at::Tensor q = q_in.contiguous(), p = p_in.contiguous(), sigma = sigma_in.contiguous(),
                   R = R_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knn_search_cpu", [&] {
    using T = scalar_t;
    search_brute_force<T>(q.data_ptr<T>(), p.data_ptr<T>(), sigma.data_ptr<T>(), R.data_ptr<T>(),
                          n, idx.data_ptr<int64_t>());
  });
  return idx;
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, CPU, m) {
  m.impl("knn_search", &neusdf::knn_search_cpu);
}
