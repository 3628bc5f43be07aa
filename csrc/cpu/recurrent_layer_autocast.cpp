// The AutocastCPU kernel of seqfast::recurrent_layer_forward: what the op does inside
// torch.autocast("cpu", dtype=torch.bfloat16).
//
// torch.nn's recurrent layers have no autocast policy of their own: their GEMMs are at::linear calls,
// which autocast runs in bfloat16, and their elementwise cell updates then mix those bfloat16 results
// with the incoming state, so ordinary type promotion decides the dtype of what comes out (ATen
// RNN.cpp, measured on torch 2.13):
//   LSTM:  c' = f*c + i*g, h' = o*tanh(c')  -> c and h keep the dtype of c0 (float32 stays float32);
//          with a projection h' = linear(...) is bfloat16 while c stays in c0's dtype.
//   GRU:   h' = (h - n)*z + n               -> h keeps the dtype of h0.
//   RNN:   h' = tanh(linear + linear)       -> bfloat16.
// (torch's unpacked LSTM without projection instead runs oneDNN's RNN primitive, which autocast casts
// to bfloat16 as a whole; seqfast.nn.LSTM reproduces that by handing this op bfloat16 states.)
//
// This kernel follows the same rule with the fused bfloat16 kernel: the input and the weight matrices
// are cast to bfloat16 (the weights through autocast's weight cache, so a cell called step after step
// converts its weights once per autocast region; the biases and h0/c0 are passed as they are), the layer
// runs in bfloat16 with float32 gates and cell state inside, and the outputs are returned in the dtypes
// above. The casts are ordinary
// differentiable ops, so the gradients reach float32 parameters in float32, as with torch.nn.
//
// float16 autocast on the CPU has no fused kernel: the op runs in the dtype it is given (float32), and
// the seqfast.nn modules delegate to torch under it (README, "bfloat16 on the CPU").
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "seqfast/op_handles.h"

#include <optional>
#include <tuple>

namespace seqfast {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// Only float32 and bfloat16 take part; a float64 argument keeps the whole call in its dtypes (autocast
// never casts float64, and the kernel wants one dtype).
bool castable(const OptTensor& t) {
  return !t.has_value() || t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16;
}

Outputs recurrent_layer_forward_autocast(const Tensor& input, const OptTensor& batch_sizes,
                                         const Tensor& hx, const OptTensor& cx, const Tensor& w_ih,
                                         const Tensor& w_hh, const OptTensor& b_ih,
                                         const OptTensor& b_hh, const OptTensor& w_hr, int64_t mode,
                                         bool reverse, bool training) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::ScalarType low = at::autocast::get_autocast_dtype(at::kCPU);
  const bool all_castable = castable(input) && castable(hx) && castable(cx) && castable(w_ih) &&
                            castable(w_hh) && castable(b_ih) && castable(b_hh) && castable(w_hr);
  if (low != at::kBFloat16 || !all_castable) {
    return ops::layer_forward().call(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode,
                                       reverse, training);
  }
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(low, t, c10::DeviceType::CPU); };
  const auto cast_opt = [&](const OptTensor& t) -> OptTensor {
    return t.has_value() ? OptTensor(cast(*t)) : std::nullopt;
  };
  // The biases and the initial states stay as they are: the kernel reads them in float32 and returns
  // hy, cy and their gradients in their own dtypes, so float32 ones are not rounded to bfloat16 on the
  // way in or out (torch's generic cells keep a float32 state float32 too).
  auto [output, hy, cy, workspace] =
      ops::layer_forward().call(cast(input), batch_sizes, hx, cx, cast(w_ih), cast(w_hh), b_ih, b_hh,
                                  cast_opt(w_hr), mode, reverse, training);
  // The dtypes torch.nn's generic cells give (see the top of this file).
  if (mode == 0) {
    const at::ScalarType c_dtype = at::promote_types(cx->scalar_type(), low);
    const at::ScalarType h_dtype = w_hr.has_value() ? low : c_dtype;
    return {output.to(h_dtype), hy.to(h_dtype), cy.to(c_dtype), workspace};
  }
  if (mode == 1) {
    const at::ScalarType h_dtype = at::promote_types(hx.scalar_type(), low);
    return {output.to(h_dtype), hy.to(h_dtype), cy, workspace};
  }
  return {output, hy.to(low), cy, workspace};
}

}  // namespace
}  // namespace cpu
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, AutocastCPU, m) {
  m.impl("recurrent_layer_forward", &seqfast::cpu::recurrent_layer_forward_autocast);
  // A cell step under autocast is the layer op at T = 1, called through the dispatcher so that the
  // policy above applies (cell_forward's own kernels have no bf16 path and no autocast rules).
  m.impl("cell_forward", &seqfast::ops::cell_forward_by_layer_op);
}
