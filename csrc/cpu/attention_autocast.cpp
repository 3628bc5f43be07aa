// Autocast policy of the seqfast attention forward ops on the CPU (registered for AutocastCPU).
//
// Under torch.autocast("cpu", dtype=...) the ops follow autocast's lower-precision policy, the one
// ATen gives matmul/bmm: every float32 input (query rows, memory, memory_proj, v) is cast to the
// autocast dtype (bfloat16 by default), float64 and integer inputs are left alone, and the op then
// runs with autocast excluded. The kernels form the score and context products of those values in
// float32 and keep the softmax and lse in float32 (attention_kernel.cpp); context and weights come back
// in the autocast dtype, which is what the padded reference (matmul -> softmax -> matmul) returns under
// the same autocast. The casts are ordinary differentiable ops, so gradients reach float32 leaves
// (master weights) in float32.
//
// Without this kernel the ops would see whatever mix of dtypes the Python side produced (the projected
// query in bfloat16, the user's memory in float32) and reject it. The backward ops need no policy: the
// autograd formula calls them with the tensors the forward saved (already cast) and a grad_context in
// the forward output's dtype; their kernels exclude autocast themselves.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace seqfast {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Outputs = std::tuple<Tensor, Tensor, Tensor>;

// The op below autocast, resolved once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Autocast's lower-precision cast of one argument (tensors that are float32; other arguments as is).
template <typename T>
decltype(auto) lower(T&& arg) {
  return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(c10::DeviceType::CPU),
                                   std::forward<T>(arg), c10::DeviceType::CPU);
}

Outputs attention_forward_autocast(const Tensor& query, const Tensor& memory, const Tensor& cu_seqlens_q,
                                   const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
                                   int64_t max_seqlen_k, double scale, bool need_weights) {
  static const auto op = op_handle<Outputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const OptTensor&, int64_t, double, bool)>(
      "seqfast::attention_forward");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  return op.call(lower(query), lower(memory), cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_k, scale,
                 need_weights);
}

Outputs additive_attention_forward_autocast(const Tensor& query_proj, const Tensor& memory_proj,
                                            const Tensor& memory, const Tensor& v,
                                            const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                            const OptTensor& seqused_k, int64_t max_seqlen_k,
                                            bool need_weights) {
  static const auto op =
      op_handle<Outputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const OptTensor&, int64_t, bool)>("seqfast::additive_attention_forward");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  return op.call(lower(query_proj), lower(memory_proj), lower(memory), lower(v), cu_seqlens_q, cu_seqlens_k,
                 seqused_k, max_seqlen_k, need_weights);
}

Outputs location_attention_forward_autocast(const Tensor& scores, const Tensor& memory,
                                            const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                            const OptTensor& seqused_k, int64_t max_seqlen_k,
                                            bool need_weights) {
  static const auto op = op_handle<Outputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const OptTensor&, int64_t, bool)>(
      "seqfast::location_attention_forward");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  return op.call(lower(scores), lower(memory), cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_k,
                 need_weights);
}

}  // namespace
}  // namespace cpu
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, AutocastCPU, m) {
  m.impl("attention_forward", &seqfast::cpu::attention_forward_autocast);
  m.impl("additive_attention_forward", &seqfast::cpu::additive_attention_forward_autocast);
  m.impl("location_attention_forward", &seqfast::cpu::location_attention_forward_autocast);
}
