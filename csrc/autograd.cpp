// The autograd kernel of seqfast::recurrent_layer_forward, for every backend (the Autograd alias key).
//
// Why in C++: torch.library.register_autograd installs a Python autograd kernel, which costs ~60-100 us
// per call on this CPU (argument normalization, a Python autograd.Function, a redispatch) — more than
// the whole math of a small cell step. This is the same autograd.Function in C++: the forward
// redispatches below autograd to the CPU/CUDA kernel and saves what the backward op needs; the backward
// calls seqfast::recurrent_layer_backward. Shapes and the fake (meta) implementations are unchanged
// (csrc/ops.cpp, seqfast/ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace seqfast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
    const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, int64_t, bool, bool);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seqfast::recurrent_layer_forward", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seqfast::recurrent_layer_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

OptTensor optional_of(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Saved-variable slots, in save_for_backward order.
enum Saved { kInput, kBatchSizes, kHx, kCx, kWih, kWhh, kBih, kBhh, kWhr, kOutput, kWorkspace };

class RecurrentLayer : public torch::autograd::Function<RecurrentLayer> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& batch_sizes,
                               const Tensor& hx, const OptTensor& cx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, int64_t mode, bool reverse, bool training) {
    Tensor output, hy, cy, workspace;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, hy, cy, workspace) = forward_op().call(
          input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training);
    }
    const Tensor none;
    ctx->save_for_backward({input, batch_sizes.value_or(none), hx, cx.value_or(none), w_ih, w_hh,
                            b_ih.value_or(none), b_hh.value_or(none), w_hr.value_or(none), output,
                            workspace});
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["training"] = training;
    // The workspace is never differentiated, and an unused output must not get a zero-filled
    // gradient of its full size: the backward fills in only the small ones it needs.
    if (mode == 0) {
      ctx->mark_non_differentiable({workspace});
    } else {
      ctx->mark_non_differentiable({cy, workspace});
    }
    ctx->set_materialize_grads(false);
    return {output, hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["training"].toBool(),
                "seqfast: recurrent_layer_forward ran with training=False, so it saved nothing for "
                "the backward. Call it with training=True when gradients are needed.");
    const variable_list saved = ctx->get_saved_variables();
    // Grad mode is on during a backward only under create_graph=True. The backward op is a fused
    // kernel without a derivative of its own, so a graph through it would be wrong: say so instead.
    if (at::GradMode::is_enabled()) {
      const auto differentiable = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
      TORCH_CHECK(std::none_of(grads.begin(), grads.end(), differentiable) &&
                      std::none_of(saved.begin(), saved.end(), differentiable),
                  "seqfast: double backward (create_graph=True) through seqfast's recurrent layers is "
                  "not supported: their backward is a fused kernel without a derivative of its own "
                  "(torch's cuDNN RNNs have the same limitation)");
    }
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor& output = saved[kOutput];
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    const Tensor grad_hy = grads[1].defined() ? grads[1] : at::zeros_like(saved[kHx]);
    const OptTensor grad_cy = mode == 0 ? optional_of(grads[2]) : std::nullopt;
    const bool input_grad = ctx->needs_input_grad(kInput);
    const auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr] = backward_op().call(
        grad_output, grad_hy, grad_cy, saved[kInput], optional_of(saved[kBatchSizes]), saved[kHx],
        optional_of(saved[kCx]), saved[kWih], saved[kWhh], optional_of(saved[kBih]),
        optional_of(saved[kBhh]), optional_of(saved[kWhr]), output, saved[kWorkspace], mode, reverse,
        input_grad);
    // One entry per forward argument; undefined where there is no gradient (batch_sizes, the
    // parameters that are None, and the int/bool arguments).
    const Tensor none;
    auto if_present = [&](Saved slot, const Tensor& g) { return saved[slot].defined() ? g : none; };
    return {input_grad ? g_input : none, none, g_hx, if_present(kCx, g_cx), g_w_ih, g_w_hh,
            if_present(kBih, g_b_ih), if_present(kBhh, g_b_hh), if_present(kWhr, g_w_hr), none, none,
            none};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> recurrent_layer_forward_autograd(
    const Tensor& input, const OptTensor& batch_sizes, const Tensor& hx, const OptTensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, int64_t mode, bool reverse, bool training) {
  // Nothing to differentiate (inference, or no_grad): skip building an autograd node.
  const auto requires_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(input.requires_grad() || hx.requires_grad() || requires_grad(cx) || w_ih.requires_grad() ||
        w_hh.requires_grad() || requires_grad(b_ih) || requires_grad(b_hh) || requires_grad(w_hr))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse,
                             training);
  }
  const variable_list out = RecurrentLayer::apply(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                                  w_hr, mode, reverse, training);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, Autograd, m) {
  m.impl("recurrent_layer_forward", &seqfast::recurrent_layer_forward_autograd);
}
