// embedloss_cpp ops: schemas, CPU kernels, autograd and the Python module embedloss_kernels._C.
//
// Every op returns (loss, grad_first, grad_second, grad_scale) with the gradients computed in the forward pass; the
// autograd kernel saves the input gradients and its backward calls embedloss_cpp::scaled_grads (grad_output * saved
// gradients) through the dispatcher, or, when the graph is released after it, scales the saved ones in place and
// hands them on (may_hand_on). Double backward is refused: nothing of the loss's graph is kept. The saved
// gradients are SavedVariables, released by the first backward: a second one without retain_graph raises PyTorch's
// "Trying to backward through the graph a second time". (The Python layer, embedloss_kernels/ops/autograd.py, wraps
// these ops in its own autograd.Function for forward mode, torch.func and the scale's gradient; this one serves
// direct calls of torch.ops.embedloss_cpp.*.)
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace embedloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> scaled_grads(const at::Tensor& grad_loss, const at::Tensor& grad_first,
                                                const at::Tensor& grad_second) {
  return {grad_first * grad_loss.to(grad_first.scalar_type()), grad_second * grad_loss.to(grad_second.scalar_type())};
}

// Whether backward may hand the saved gradients on (scaled in place) instead of copying them: the engine releases
// them as soon as this node has run (no retain_graph / create_graph), and they are plain tensors, not the fake or
// functional tensors of a compile trace, nor one buffer behind both. AccumulateGrad then keeps them as .grad with no
// copy. Under a retained graph .grad must not share their storage: an in-place change would reach the next backward.
bool may_hand_on(const at::Tensor& grad_first, const at::Tensor& grad_second) {
  if (torch::autograd::get_current_graph_task_id() == -1 || torch::autograd::get_current_graph_task_keep_graph()) {
    return false;
  }
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  for (const at::Tensor* t : {&grad_first, &grad_second}) {
    if (!t->defined() || t->key_set().has_any(traced) || t->layout() != at::kStrided) return false;
  }
  return !grad_first.storage().is_alias_of(grad_second.storage());
}

at::Tensor scale_in_place(const at::Tensor& saved, const at::Tensor& grad_loss) {
  const at::Tensor factor = grad_loss.to(saved.scalar_type());
  if (factor.device().is_cpu() && factor.item<double>() == 1.0) return saved;  // the usual loss.backward()
  return saved.mul_(factor);
}

variable_list backward_from_saved(AutogradContext* ctx, const variable_list& grad_outputs, size_t n_inputs) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "embedloss_kernels losses do not support double backward (create_graph=True): their gradient is "
              "computed in the forward pass. Use embedloss_kernels.reference for higher-order derivatives.");
  const variable_list saved = ctx->get_saved_variables();  // raises once a backward has released them
  const at::Tensor& grad_first = saved[0];
  const at::Tensor& grad_second = saved[1];
  TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
              "the loss was computed without gradients (compute_grad=False) but backward was called");
  variable_list out(n_inputs);
  if (!grad_outputs[0].defined()) return out;
  if (may_hand_on(grad_first, grad_second)) {
    out[0] = scale_in_place(grad_first, grad_outputs[0]);
    out[1] = scale_in_place(grad_second, grad_outputs[0]);
    return out;
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("embedloss_cpp::scaled_grads", "")
                       .typed<decltype(scaled_grads)>();
  std::tie(out[0], out[1]) = op.call(grad_outputs[0], grad_first, grad_second);
  return out;
}

void save_grads(AutogradContext* ctx, const at::Tensor& grad_first, const at::Tensor& grad_second,
                const at::Tensor& grad_scale, bool compute_grad) {
  ctx->saved_data["compute_grad"] = compute_grad;
  ctx->set_materialize_grads(false);  // the gradients' own outputs never get a gradient: no zero-filled copies
  ctx->save_for_backward({grad_first, grad_second});
  ctx->mark_non_differentiable({grad_first, grad_second, grad_scale});
}

class InfonceFunction : public torch::autograd::Function<InfonceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& a, int64_t row_start,
                               int64_t row_count, double scale, bool cosine, int64_t directions, bool joint,
                               int64_t hardness_mode, double hardness_strength, bool compute_grad,
                               int64_t block_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("embedloss_cpp::infonce", "")
                         .typed<decltype(infonce_cpu)>();
    auto [loss, grad_q, grad_a, grad_scale] = op.call(q, a, row_start, row_count, scale, cosine, directions, joint,
                                                      hardness_mode, hardness_strength, compute_grad, block_rows);
    save_grads(ctx, grad_q, grad_a, grad_scale, compute_grad);
    return {loss, grad_q, grad_a, grad_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_from_saved(ctx, grad_outputs, 12);
  }
};

class CosentFunction : public torch::autograd::Function<CosentFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y,
                               const at::Tensor& labels, double scale, int64_t similarity, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("embedloss_cpp::cosent", "")
                         .typed<decltype(cosent_cpu)>();
    auto [loss, grad_x, grad_y, grad_scale] = op.call(x, y, labels, scale, similarity, compute_grad);
    save_grads(ctx, grad_x, grad_y, grad_scale, compute_grad);
    return {loss, grad_x, grad_y, grad_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_from_saved(ctx, grad_outputs, 6);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_autograd(
    const at::Tensor& q, const at::Tensor& a, int64_t row_start, int64_t row_count, double scale, bool cosine,
    int64_t directions, bool joint, int64_t hardness_mode, double hardness_strength, bool compute_grad,
    int64_t block_rows) {
  auto out = InfonceFunction::apply(q, a, row_start, row_count, scale, cosine, directions, joint, hardness_mode,
                                    hardness_strength, compute_grad, block_rows);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosent_autograd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale, int64_t similarity,
    bool compute_grad) {
  auto out = CosentFunction::apply(x, y, labels, scale, similarity, compute_grad);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace embedloss

// Schemas: identical to INFONCE_SCHEMA / COSENT_SCHEMA in embedloss_kernels/ops/__init__.py.
TORCH_LIBRARY(embedloss_cpp, m) {
  m.def(
      "infonce(Tensor q, Tensor a, int row_start, int row_count, float scale, bool cosine, int directions, "
      "bool joint, int hardness_mode, float hardness_strength, bool compute_grad, int block_rows) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cosent(Tensor x, Tensor y, Tensor labels, float scale, int similarity, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scaled_grads(Tensor grad_loss, Tensor grad_first, Tensor grad_second) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) {
  m.impl("infonce", &embedloss::infonce_cpu);
  m.impl("cosent", &embedloss::cosent_cpu);
}

TORCH_LIBRARY_IMPL(embedloss_cpp, CompositeExplicitAutograd, m) {
  m.impl("scaled_grads", &embedloss::scaled_grads);
}

TORCH_LIBRARY_IMPL(embedloss_cpp, Autograd, m) {
  m.impl("infonce", &embedloss::infonce_autograd);
  m.impl("cosent", &embedloss::cosent_autograd);
}

// The module: importing embedloss_kernels._C loads the library and runs the registrations above. Its one function,
// graph_task_keeps_graph(), tells the Python autograd (embedloss_kernels/ops/autograd.py) whether the backward running
// on this thread keeps the graph (retain_graph / create_graph): only when it does not may the saved gradients be
// scaled in place and handed on, since the engine releases them as soon as the node has run.
static PyObject* graph_task_keeps_graph(PyObject*, PyObject*) {
  if (torch::autograd::get_current_graph_task_id() == -1) Py_RETURN_TRUE;  // not inside a backward: assume it does
  if (torch::autograd::get_current_graph_task_keep_graph()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyMethodDef embedloss_methods[] = {
    {"graph_task_keeps_graph", graph_task_keeps_graph, METH_NOARGS,
     "Whether the autograd graph task running on this thread keeps its graph (True outside any backward)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef embedloss_module = {PyModuleDef_HEAD_INIT, "_C", "embedloss_cpp ops", -1,
                                              embedloss_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&embedloss_module); }
