// embedloss_cpp::gist: schema, CPU kernel and autograd, added to the embedloss_cpp library as a fragment (the
// library, scaled_grads and the module are defined in embedloss.cpp).
//
// As the other ops: the gradients are computed in the forward pass; the autograd kernel saves them and its backward
// calls embedloss_cpp::scaled_grads through the dispatcher. The guide's embeddings get no gradient. Double backward
// is refused.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/gist.h"

namespace embedloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GistFunction : public torch::autograd::Function<GistFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& anchor, const at::Tensor& candidates,
                               const at::Tensor& anchor_guide, const at::Tensor& candidates_guide, int64_t columns,
                               int64_t row_start, double scale, int64_t margin_strategy, double margin,
                               bool contrast_anchors, bool contrast_positives, bool compute_grad,
                               int64_t block_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("embedloss_cpp::gist", "").typed<decltype(gist_cpu)>();
    auto [loss, grad_anchor, grad_candidates] =
        op.call(anchor, candidates, anchor_guide, candidates_guide, columns, row_start, scale, margin_strategy,
                margin, contrast_anchors, contrast_positives, compute_grad, block_rows);
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["grad_first"] = grad_anchor;
    ctx->saved_data["grad_second"] = grad_candidates;
    ctx->mark_non_differentiable({grad_anchor, grad_candidates});
    return {loss, grad_anchor, grad_candidates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "embedloss_kernels losses do not support double backward (create_graph=True): their gradient is "
                "computed in the forward pass. Use embedloss_kernels.reference for higher-order derivatives.");
    TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
                "the loss was computed without gradients (compute_grad=False) but backward was called");
    variable_list out(13);
    if (!grad_outputs[0].defined()) return out;
    using ScaledGrads = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("embedloss_cpp::scaled_grads", "").typed<ScaledGrads>();
    std::tie(out[0], out[1]) =
        op.call(grad_outputs[0], ctx->saved_data["grad_first"].toTensor(), ctx->saved_data["grad_second"].toTensor());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_autograd(
    const at::Tensor& anchor, const at::Tensor& candidates, const at::Tensor& anchor_guide,
    const at::Tensor& candidates_guide, int64_t columns, int64_t row_start, double scale, int64_t margin_strategy,
    double margin, bool contrast_anchors, bool contrast_positives, bool compute_grad, int64_t block_rows) {
  auto out = GistFunction::apply(anchor, candidates, anchor_guide, candidates_guide, columns, row_start, scale,
                                 margin_strategy, margin, contrast_anchors, contrast_positives, compute_grad,
                                 block_rows);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace embedloss

// Schema: identical to GIST_SCHEMA in embedloss_kernels/ops/__init__.py.
TORCH_LIBRARY_FRAGMENT(embedloss_cpp, m) {
  m.def(
      "gist(Tensor anchor, Tensor candidates, Tensor anchor_guide, Tensor candidates_guide, int columns, "
      "int row_start, float scale, int margin_strategy, float margin, bool contrast_anchors, "
      "bool contrast_positives, bool compute_grad, int block_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) { m.impl("gist", &embedloss::gist_cpu); }

TORCH_LIBRARY_IMPL(embedloss_cpp, Autograd, m) { m.impl("gist", &embedloss::gist_autograd); }
