#pragma once
// Typed dispatcher handles of the recurrent ops, for C++ code that calls them through the dispatcher
// (the autograd kernels in csrc/autograd.cpp, the cell kernels' hand-offs to the layer ops in
// csrc/cpu/cell_step_kernel.cpp). Schemas and argument shapes: csrc/ops.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <tuple>

namespace seqfast {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using LayerForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool, bool);
using LayerBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
    const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, int64_t, bool, bool);
using CellForwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                        const Tensor&, const Tensor&, const OptTensor&,
                                                        const OptTensor&, int64_t);
using CellBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, int64_t,
    bool);

// The handle of seqfast::<name> (by value: typed() makes a new handle); each accessor below keeps one.
template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline const c10::TypedOperatorHandle<LayerForwardSignature>& layer_forward() {
  static const auto op = handle<LayerForwardSignature>("seqfast::recurrent_layer_forward");
  return op;
}
inline const c10::TypedOperatorHandle<LayerBackwardSignature>& layer_backward() {
  static const auto op = handle<LayerBackwardSignature>("seqfast::recurrent_layer_backward");
  return op;
}
inline const c10::TypedOperatorHandle<CellForwardSignature>& cell_forward() {
  static const auto op = handle<CellForwardSignature>("seqfast::cell_forward");
  return op;
}
inline const c10::TypedOperatorHandle<CellBackwardSignature>& cell_backward() {
  static const auto op = handle<CellBackwardSignature>("seqfast::cell_backward");
  return op;
}

// The cell ops as the layer op at T = 1: the CPU cell kernels hand larger or unusual steps to these, and
// on devices without a cell kernel of their own (CUDA) they are the cell ops' kernels. The layer ops
// check every argument with their own messages.
inline std::tuple<Tensor, Tensor> cell_forward_by_layer_op(const Tensor& input, const Tensor& hx,
                                                           const OptTensor& cx, const Tensor& w_ih,
                                                           const Tensor& w_hh, const OptTensor& b_ih,
                                                           const OptTensor& b_hh, int64_t mode) {
  const auto [output, hy, cy, workspace] =
      layer_forward().call(input.unsqueeze(0), std::nullopt, hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt,
                           mode, /*reverse=*/false, /*training=*/false);
  return {hy, cy};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_backward_by_layer_op(
    const OptTensor& grad_output, const OptTensor& grad_hy, const OptTensor& grad_cy, const Tensor& input,
    const Tensor& hx, const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
    const OptTensor& b_hh, const Tensor& output, const Tensor& workspace, int64_t mode, bool input_grad) {
  const Tensor go = grad_output.has_value() ? *grad_output : at::zeros_like(output);
  const Tensor ghy = grad_hy.has_value() ? *grad_hy : at::zeros_like(hx);
  const auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr] = layer_backward().call(
      go, ghy, grad_cy, input, std::nullopt, hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt, output,
      workspace, mode, /*reverse=*/false, input_grad);
  return {g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh};
}

}  // namespace ops
}  // namespace seqfast
