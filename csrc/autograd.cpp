// The autograd kernel of seqfast::recurrent_layer_forward, for every backend (the Autograd alias key).
//
// Why in C++: torch.library.register_autograd installs a Python autograd kernel, which costs ~60-100 us
// per call on this CPU (argument normalization, a Python autograd.Function, a redispatch) — more than
// the whole math of a small cell step. This is the same autograd.Function in C++: the forward
// redispatches below autograd to the CPU/CUDA kernel and saves what the backward op needs; the backward
// calls seqfast::recurrent_layer_backward. Shapes and the fake (meta) implementations are unchanged
// (csrc/ops.cpp, seqfast/ops.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "seqfast/op_handles.h"

#include <algorithm>
#include <optional>
#include <tuple>

namespace seqfast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Through the dispatcher (csrc/include/seqfast/op_handles.h).
const auto& forward_op = ops::layer_forward;
const auto& backward_op = ops::layer_backward;
const auto& cell_backward_op = ops::cell_backward;
const auto& cell_op = ops::cell_forward;

OptTensor optional_of(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Saved-variable slots, in save_for_backward order.
enum Saved { kInput, kBatchSizes, kHx, kCx, kWih, kWhh, kBih, kBhh, kWhr, kOutput, kWorkspace };

// torch's own differentiable implementation of one layer in one direction, on the saved tensors.
// reverse: the backward half of a bidirectional layer whose forward half has the same weights and is
// discarded (that is how torch runs a reversed packed sequence, each from its own end). Returns output,
// hy, cy (undefined for GRU/RNN).
std::tuple<Tensor, Tensor, Tensor> torch_layer(const variable_list& saved, int64_t mode, bool reverse) {
  const Tensor& input = saved[kInput];
  const Tensor& batch_sizes = saved[kBatchSizes];
  const bool has_biases = saved[kBih].defined();
  TORCH_CHECK(has_biases == saved[kBhh].defined(),
              "seqfast: double backward needs both biases or neither, like torch.nn's layers");
  std::vector<Tensor> params{saved[kWih], saved[kWhh]};
  if (has_biases) params.insert(params.end(), {saved[kBih], saved[kBhh]});
  if (saved[kWhr].defined()) params.push_back(saved[kWhr]);
  if (reverse) {
    const std::vector<Tensor> one_direction = params;
    params.insert(params.end(), one_direction.begin(), one_direction.end());
  }
  const auto states = [&](const Tensor& state) {
    return reverse ? at::stack({state, state}) : state.unsqueeze(0);
  };
  const bool packed = batch_sizes.defined();
  Tensor output, hy, cy;
  if (mode == 0) {
    const std::vector<Tensor> hx{states(saved[kHx]), states(saved[kCx])};
    std::tie(output, hy, cy) =
        packed ? at::lstm(input, batch_sizes, hx, params, has_biases, 1, 0.0, true, reverse)
               : at::lstm(input, hx, params, has_biases, 1, 0.0, true, reverse, false);
  } else {
    const Tensor hx = states(saved[kHx]);
    const auto run = [&](auto packed_fn, auto padded_fn) {
      return packed ? packed_fn(input, batch_sizes, hx, params, has_biases, 1, 0.0, true, reverse)
                    : padded_fn(input, hx, params, has_biases, 1, 0.0, true, reverse, false);
    };
    using Packed = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&,
                                                  at::TensorList, bool, int64_t, double, bool, bool);
    using Padded = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, at::TensorList, bool,
                                                  int64_t, double, bool, bool, bool);
    if (mode == 1) {
      std::tie(output, hy) = run(static_cast<Packed>(&at::gru), static_cast<Padded>(&at::gru));
    } else if (mode == 2) {
      std::tie(output, hy) = run(static_cast<Packed>(&at::rnn_tanh), static_cast<Padded>(&at::rnn_tanh));
    } else {
      std::tie(output, hy) = run(static_cast<Packed>(&at::rnn_relu), static_cast<Padded>(&at::rnn_relu));
    }
  }
  const int64_t direction = reverse ? 1 : 0, P = saved[kHx].size(-1);
  if (reverse) output = output.narrow(-1, P, P);
  return {output, hy.select(0, direction), cy.defined() ? cy.select(0, direction) : cy};
}

// The backward under create_graph=True: the gradients of torch_layer's outputs, with a graph, for every
// forward argument that requires grad. One entry per forward argument, like RecurrentLayer::backward.
variable_list differentiable_backward(const variable_list& saved, const variable_list& grads, int64_t mode,
                                      bool reverse) {
  const auto [output, hy, cy] = torch_layer(saved, mode, reverse);
  variable_list outputs{output, hy};
  variable_list grad_outputs{grads[0].defined() ? grads[0] : at::zeros_like(output),
                             grads[1].defined() ? grads[1] : at::zeros_like(hy)};
  if (mode == 0 && grads[2].defined()) {
    outputs.push_back(cy);
    grad_outputs.push_back(grads[2]);
  }
  variable_list wrt;
  std::vector<int> slot_of;
  for (const Saved slot : {kInput, kHx, kCx, kWih, kWhh, kBih, kBhh, kWhr}) {
    if (saved[slot].defined() && saved[slot].requires_grad()) {
      wrt.push_back(saved[slot]);
      slot_of.push_back(slot);
    }
  }
  variable_list result(12);  // the forward's 12 arguments
  if (wrt.empty()) return result;
  const variable_list g = torch::autograd::grad(outputs, wrt, grad_outputs, /*retain_graph=*/true,
                                                /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < g.size(); ++k) result[slot_of[k]] = g[k];
  return result;
}

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
    const variable_list saved = ctx->get_saved_variables();
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    // Grad mode is on during a backward only under create_graph=True (double backward: gradient
    // penalties, second-order meta-learning). The fused backward kernel has no derivative of its own,
    // so then the gradients come from re-running the layer through torch's own differentiable
    // implementation and differentiating that, with a graph (see differentiable_backward).
    if (at::GradMode::is_enabled()) {
      const auto differentiable = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
      if (std::any_of(grads.begin(), grads.end(), differentiable) ||
          std::any_of(saved.begin(), saved.end(), differentiable)) {
        return differentiable_backward(saved, grads, mode, reverse);
      }
    }
    const Tensor& output = saved[kOutput];
    const bool input_grad = ctx->needs_input_grad(kInput);
    if (is_cell_step(saved, reverse)) {
      const auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh] = cell_backward_op().call(
          optional_of(grads[0]), optional_of(grads[1]), mode == 0 ? optional_of(grads[2]) : std::nullopt,
          saved[kInput], saved[kHx], optional_of(saved[kCx]), saved[kWih], saved[kWhh],
          optional_of(saved[kBih]), optional_of(saved[kBhh]), output, saved[kWorkspace], mode, input_grad);
      return gradients(saved, input_grad, g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, Tensor());
    }
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    const Tensor grad_hy = grads[1].defined() ? grads[1] : at::zeros_like(saved[kHx]);
    const OptTensor grad_cy = mode == 0 ? optional_of(grads[2]) : std::nullopt;
    const auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr] = backward_op().call(
        grad_output, grad_hy, grad_cy, saved[kInput], optional_of(saved[kBatchSizes]), saved[kHx],
        optional_of(saved[kCx]), saved[kWih], saved[kWhh], optional_of(saved[kBih]),
        optional_of(saved[kBhh]), optional_of(saved[kWhr]), output, saved[kWorkspace], mode, reverse,
        input_grad);
    return gradients(saved, input_grad, g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr);
  }

 private:
  // One unpacked CPU step without projection: seqfast::cell_backward, which skips the layer backward's
  // per-call allocations and GEMM calls for tiny steps (and hands larger ones back to it).
  static bool is_cell_step(const variable_list& saved, bool reverse) {
    const Tensor& input = saved[kInput];
    return !reverse && !saved[kBatchSizes].defined() && !saved[kWhr].defined() && input.is_cpu() &&
           input.dim() == 3 && input.size(0) == 1;
  }

  // One entry per forward argument; undefined where there is no gradient (batch_sizes, the
  // parameters that are None, and the int/bool arguments).
  static variable_list gradients(const variable_list& saved, bool input_grad, const Tensor& g_input,
                                 const Tensor& g_hx, const Tensor& g_cx, const Tensor& g_w_ih,
                                 const Tensor& g_w_hh, const Tensor& g_b_ih, const Tensor& g_b_hh,
                                 const Tensor& g_w_hr) {
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
  // A node is recorded, so its backward needs the workspace whatever `training` says: the caller's
  // flag cannot always know (a torch.jit.trace graph holds it as a constant recorded once, and must
  // not depend on the grad mode at trace time).
  const variable_list out = RecurrentLayer::apply(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                                  w_hr, mode, reverse, /*training=*/true);
  return {out[0], out[1], out[2], out[3]};
}

// seqfast::cell_forward. With a graph to record, it is the layer op at T = 1 (its autograd node and
// backward); without, the backend's cell kernel, which skips the layer op's per-call allocations.
std::tuple<Tensor, Tensor> cell_forward_autograd(const Tensor& input, const Tensor& hx, const OptTensor& cx,
                                                 const Tensor& w_ih, const Tensor& w_hh,
                                                 const OptTensor& b_ih, const OptTensor& b_hh, int64_t mode) {
  const auto requires_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || hx.requires_grad() || requires_grad(cx) || w_ih.requires_grad() ||
       w_hh.requires_grad() || requires_grad(b_ih) || requires_grad(b_hh))) {
    const auto [output, hy, cy, workspace] = recurrent_layer_forward_autograd(
        input.unsqueeze(0), std::nullopt, hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt, mode,
        /*reverse=*/false, /*training=*/true);
    return {hy, cy};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return cell_op().call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode);
}

}  // namespace
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, Autograd, m) {
  m.impl("recurrent_layer_forward", &seqfast::recurrent_layer_forward_autograd);
  m.impl("cell_forward", &seqfast::cell_forward_autograd);
}
