// Autograd of the anisotropic kNN aggregation, in C++ (the Autograd dispatch key):
//   knn_aggregate -> knn_aggregate_backward -> knn_aggregate_double_backward -> error.
//
// Each forward redispatches below autograd to the CPU/CUDA kernel; each backward calls the
// next operator through the dispatcher, so that with create_graph the backward is itself
// recorded and differentiable. Why C++ and not torch.library.register_autograd: on the H100
// host the Python autograd layers cost about 1 ms per Eikonal step, more than our kernels
// (benchmarks/RESULTS.md). Fake kernels stay in Python (neusdf/ops/knn.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "knn_aggregate.h"

namespace neusdf {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor8 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

// Typed dispatcher handles of the operators (looked up once).
Tensor3 aggregate_op(const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                     const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx,
                     const OptTensor& order) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("neusdf::knn_aggregate", "")
                             .typed<Tensor3(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&,
                                            const OptTensor&)>();
  return op.call(q, p, f, s, R, idx, order);
}

Tensor5 backward_op(const OptTensor& gf, const OptTensor& gw, const OptTensor& gD,
                    const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                    const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx,
                    const OptTensor& order) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("neusdf::knn_aggregate_backward", "")
          .typed<Tensor5(const OptTensor&, const OptTensor&, const OptTensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptTensor&)>();
  return op.call(gf, gw, gD, q, p, f, s, R, idx, order);
}

Tensor8 double_backward_op(const at::Tensor& ggq, const OptTensor& gf, const OptTensor& gw,
                           const OptTensor& gD, const at::Tensor& q, const at::Tensor& p,
                           const at::Tensor& f, const at::Tensor& s, const at::Tensor& R,
                           const at::Tensor& idx, const OptTensor& order) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("neusdf::knn_aggregate_double_backward", "")
          .typed<Tensor8(const at::Tensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const OptTensor&)>();
  return op.call(ggq, gf, gw, gD, q, p, f, s, R, idx, order);
}

OptTensor optional_of(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// The op's formula on the gathered neighbours with differentiable ATen ops (the reference of
// neusdf/ops/reference.py without the search): used only for the rare upstreams below.
Tensor3 aggregate_by_gathering(const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                               const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx) {
  const int64_t B = idx.size(0), Q = idx.size(1), K = idx.size(2);
  const at::Tensor flat = idx.reshape({B, Q * K, 1});
  const auto gather = [&](const at::Tensor& t) {  // (B, P, ...) -> (B, Q, K, ...)
    const at::Tensor rows = t.reshape({B, t.size(1), -1});
    std::vector<int64_t> shape = {B, Q, K};
    for (int64_t i = 2; i < t.dim(); ++i) shape.push_back(t.size(i));
    return at::gather(rows, 1, flat.expand({B, Q * K, rows.size(2)})).reshape(shape);
  };
  const at::Tensor d = q.unsqueeze(2) - gather(p);
  const at::Tensor u = at::matmul(gather(R), d.unsqueeze(-1)).squeeze(-1);
  const at::Tensor D = (gather(s) * u * u).sum(-1);
  const at::Tensor w = at::exp(-D);
  return {(w.unsqueeze(-1) * gather(f)).sum(2), w, D};
}

class DoubleBackwardFunction : public torch::autograd::Function<DoubleBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ggq, const OptTensor& gf,
                               const OptTensor& gw, const OptTensor& gD, const at::Tensor& q,
                               const at::Tensor& p, const at::Tensor& f, const at::Tensor& s,
                               const at::Tensor& R, const at::Tensor& idx,
                               const OptTensor& order) {
    at::AutoDispatchBelowADInplaceOrView below;
    const auto out = double_backward_op(ggq, gf, gw, gD, q, p, f, s, R, idx, order);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
            std::get<4>(out), std::get<5>(out), std::get<6>(out), std::get<7>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, "neusdf: third-order derivatives of knn_aggregate_aniso are not supported");
  }
};

class BackwardFunction : public torch::autograd::Function<BackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const OptTensor& gf, const OptTensor& gw,
                               const OptTensor& gD, const at::Tensor& q, const at::Tensor& p,
                               const at::Tensor& f, const at::Tensor& s, const at::Tensor& R,
                               const at::Tensor& idx, const OptTensor& order) {
    ctx->set_materialize_grads(false);  // unused outputs give undefined grads: skip their work
    ctx->save_for_backward({gf.value_or(at::Tensor()), gw.value_or(at::Tensor()),
                            gD.value_or(at::Tensor()), q, p, f, s, R, idx,
                            order.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below;
    const auto out = backward_op(gf, gw, gD, q, p, f, s, R, idx, order);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
            std::get<4>(out)};
  }

  // grads: upstreams of (grad_q, grad_p, grad_f, grad_sigma, grad_R). Returns the gradients of
  // (gf, gw, gD, q, p, f, sigma, R, idx, order).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list v = ctx->get_saved_variables();
    const at::Tensor &gf = v[0], &gw = v[1], &gD = v[2], &q = v[3], &p = v[4], &f = v[5],
                     &s = v[6], &R = v[7], &idx = v[8], &order = v[9];
    variable_list out(10);
    if (grads[0].defined()) {  // the query gradient's upstream: the fast kernels
      const auto fast = double_backward_op(grads[0], optional_of(gf), optional_of(gw),
                                           optional_of(gD), q, p, f, s, R, idx,
                                           optional_of(order));
      // The gradient of an absent upstream comes back empty; its input is None.
      out[0] = gf.defined() ? std::get<0>(fast) : at::Tensor();
      out[1] = gw.defined() ? std::get<1>(fast) : at::Tensor();
      out[2] = gD.defined() ? std::get<2>(fast) : at::Tensor();
      out[3] = std::get<3>(fast);
      out[4] = std::get<4>(fast);
      out[5] = std::get<5>(fast);
      out[6] = std::get<6>(fast);
      out[7] = std::get<7>(fast);
    }
    if (grads[1].defined() || grads[2].defined() || grads[3].defined() || grads[4].defined()) {
      add_rare_upstreams(gf, gw, gD, q, p, f, s, R, idx, grads, out);
    }
    return out;
  }

 private:
  // Exact gradients for upstreams of grad_p, grad_f, grad_sigma, grad_R (rare: the Eikonal
  // loss gives none): autograd twice through aggregate_by_gathering, O(B Q K F) memory.
  static void add_rare_upstreams(const at::Tensor& gf, const at::Tensor& gw, const at::Tensor& gD,
                                 const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                                 const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx,
                                 const variable_list& grads, variable_list& out) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "neusdf: third-order derivatives of knn_aggregate_aniso are not supported");
    at::AutoGradMode grad_on(true);
    const auto leaf = [](const at::Tensor& t) {
      return t.defined() ? t.detach().requires_grad_(true) : at::Tensor();
    };
    const variable_list ups = {leaf(gf), leaf(gw), leaf(gD)};
    const variable_list inputs = {leaf(q), leaf(p), leaf(f), leaf(s), leaf(R)};
    const auto fwd = aggregate_by_gathering(inputs[0], inputs[1], inputs[2], inputs[3],
                                            inputs[4], idx);
    const variable_list outs = {std::get<0>(fwd), std::get<1>(fwd), std::get<2>(fwd)};
    variable_list used_outs, used_ups;
    for (int i = 0; i < 3; ++i) {
      if (ups[i].defined()) {
        used_outs.push_back(outs[i]);
        used_ups.push_back(ups[i]);
      }
    }
    const variable_list first =
        torch::autograd::grad(used_outs, {inputs[1], inputs[2], inputs[3], inputs[4]}, used_ups,
                              /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
    variable_list targets, target_grads;
    for (int i = 0; i < 4; ++i) {
      if (grads[i + 1].defined() && first[i].defined()) {
        targets.push_back(first[i]);
        target_grads.push_back(grads[i + 1]);
      }
    }
    if (targets.empty()) return;
    variable_list wrt;
    for (const auto& u : ups)
      if (u.defined()) wrt.push_back(u);
    wrt.insert(wrt.end(), inputs.begin(), inputs.end());
    const variable_list second = torch::autograd::grad(targets, wrt, target_grads,
                                                       /*retain_graph=*/false,
                                                       /*create_graph=*/false,
                                                       /*allow_unused=*/true);
    size_t next = 0;
    for (int i = 0; i < 8; ++i) {
      if (i < 3 && !ups[i].defined()) continue;
      const at::Tensor& g = second[next++];
      if (!g.defined()) continue;
      out[i] = out[i].defined() ? out[i] + g : g;
    }
  }
};

class AggregateFunction : public torch::autograd::Function<AggregateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& p,
                               const at::Tensor& f, const at::Tensor& s, const at::Tensor& R,
                               const at::Tensor& idx, const OptTensor& order) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, p, f, s, R, idx, order.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below;
    const auto out = aggregate_op(q, p, f, s, R, idx, order);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list v = ctx->get_saved_variables();
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) {
      return variable_list(7);
    }
    // Through the dispatcher: with create_graph this records BackwardFunction.
    const auto g = backward_op(optional_of(grads[0]), optional_of(grads[1]),
                               optional_of(grads[2]), v[0], v[1], v[2], v[3], v[4], v[5],
                               optional_of(v[6]));
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g),
            at::Tensor(), at::Tensor()};
  }
};

Tensor3 aggregate_autograd(const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                           const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx,
                           const OptTensor& order) {
  const auto out = AggregateFunction::apply(q, p, f, s, R, idx, order);
  return {out[0], out[1], out[2]};
}

Tensor5 backward_autograd(const OptTensor& gf, const OptTensor& gw, const OptTensor& gD,
                          const at::Tensor& q, const at::Tensor& p, const at::Tensor& f,
                          const at::Tensor& s, const at::Tensor& R, const at::Tensor& idx,
                          const OptTensor& order) {
  const auto out = BackwardFunction::apply(gf, gw, gD, q, p, f, s, R, idx, order);
  return {out[0], out[1], out[2], out[3], out[4]};
}

Tensor8 double_backward_autograd(const at::Tensor& ggq, const OptTensor& gf, const OptTensor& gw,
                                 const OptTensor& gD, const at::Tensor& q, const at::Tensor& p,
                                 const at::Tensor& f, const at::Tensor& s, const at::Tensor& R,
                                 const at::Tensor& idx, const OptTensor& order) {
  const auto out = DoubleBackwardFunction::apply(ggq, gf, gw, gD, q, p, f, s, R, idx, order);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}

}  // namespace
}  // namespace neusdf

TORCH_LIBRARY_IMPL(neusdf, Autograd, m) {
  // The searches return integer indices only: nothing to differentiate, no node to record.
  m.impl("knn_search", torch::CppFunction::makeFallthrough());
  m.impl("knn_search_ordered", torch::CppFunction::makeFallthrough());
  m.impl("knn_aggregate", &neusdf::aggregate_autograd);
  m.impl("knn_aggregate_backward", &neusdf::backward_autograd);
  m.impl("knn_aggregate_double_backward", &neusdf::double_backward_autograd);
}
