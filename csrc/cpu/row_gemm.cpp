#include "row_gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>

namespace seqfast {
namespace cpu {
namespace {

// torch's registered oneDNN linear ops, looked up once. Absent in builds without oneDNN.
struct OneDnnOps {
  std::optional<c10::OperatorHandle> reorder;  // mkldnn::_reorder_linear_weight(Tensor, int?)
  std::optional<c10::OperatorHandle> linear;   // mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algo?)

  OneDnnOps() {
    const char* off = std::getenv("SEQFAST_DISABLE_ONEDNN");
    if (off != nullptr && std::strcmp(off, "0") != 0) return;
    if (!at::hasMKLDNN()) return;
    auto& dispatcher = c10::Dispatcher::singleton();
    reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    if (!reorder || !linear) {
      reorder.reset();
      linear.reset();
    }
  }
  bool available() const { return linear.has_value(); }
};

const OneDnnOps& onednn_ops() {
  static OneDnnOps ops;
  return ops;
}

// Boxed calls: the ops are registered by torch with their own C++ signatures, so going through the
// boxed interface avoids depending on them. The boxing costs ~1-2 us per call, small against a GEMM
// that is worth sending to oneDNN at all.
at::Tensor onednn_reorder(const at::Tensor& weight, int64_t max_rows) {
  torch::jit::Stack stack{weight.contiguous(), c10::IValue(max_rows)};
  onednn_ops().reorder->callBoxed(&stack);
  return stack.at(0).toTensor();
}

at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias = std::nullopt) {
  c10::impl::GenericList no_scalars(c10::OptionalType::create(c10::NumberType::get()));
  torch::jit::Stack stack{a, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                          c10::IValue("none"), c10::IValue(no_scalars), c10::IValue()};
  onednn_ops().linear->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// Reordering the weight costs a copy of it plus ~100-200 us of oneDNN setup; measured on a 1x16x64
// cell step it made the call 10x slower. Below ~2^26 multiply-adds over all calls at::mm is as good.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 26;

bool use_onednn(const at::Tensor& weight, int64_t rows) {
  return weight.scalar_type() == at::kFloat && weight.device().is_cpu() &&
         onednn_ops().available() && weight.numel() > 0 && rows > 0 &&
         rows * weight.numel() >= kOneDnnMinMacs;
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  if (use_onednn(weight, x.size(0))) {
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    return onednn_linear(x.contiguous(), onednn_reorder(weight, x.size(0)), b);
  }
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

RowGemm::RowGemm(const at::Tensor& weight, int64_t max_rows, int64_t total_rows) {
  TORCH_INTERNAL_ASSERT(weight.dim() == 2);
  weight_t_ = weight.t();
  if (max_rows > 0 && use_onednn(weight, total_rows)) packed_ = onednn_reorder(weight, max_rows);
}

at::Tensor RowGemm::compute(const at::Tensor& a, const at::Tensor& scratch) {
  if (packed_.defined()) return onednn_linear(a, packed_);
  at::Tensor out = scratch.narrow(0, 0, a.size(0));
  at::mm_out(out, a, weight_t_);
  return out;
}

void RowGemm::compute_into(const at::Tensor& a, const at::Tensor& out, bool accumulate) {
  if (packed_.defined()) {
    at::Tensor y = onednn_linear(a, packed_);
    if (accumulate) {
      out.add_(y);
    } else {
      out.copy_(y);
    }
  } else if (accumulate) {
    out.addmm_(a, weight_t_);
  } else {
    auto o = out;
    at::mm_out(o, a, weight_t_);
  }
}

}  // namespace cpu
}  // namespace seqfast
