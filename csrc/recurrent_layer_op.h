#pragma once
// Typed handles of the recurrent ops, for the C++ kernels that call them through the dispatcher (the
// autograd kernel in csrc/autograd.cpp, the autocast kernel in csrc/cpu/recurrent_layer_autocast.cpp).
// The schemas are in csrc/ops.cpp.
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace seqfast {

using RecurrentForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, bool, bool);

// seqfast::recurrent_layer_forward, looked up once.
inline const c10::TypedOperatorHandle<RecurrentForwardSignature>& recurrent_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seqfast::recurrent_layer_forward", "")
                             .typed<RecurrentForwardSignature>();
  return op;
}

}  // namespace seqfast
