#pragma once
// Typed dispatcher handles of the recurrent ops, for C++ code that calls them through the dispatcher
// (the autograd kernels in csrc/autograd.cpp, the cell kernels' hand-offs to the layer ops in
// csrc/cpu/cell_step_kernel.cpp). Schemas and argument shapes: csrc/ops.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

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

}  // namespace ops
}  // namespace seqfast
