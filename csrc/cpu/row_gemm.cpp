#include "row_gemm.h"

#include "buffers.h"
#include "dot_rows.h"
#include "multiversion.h"
#include "small_gemm.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace seqfast {
namespace cpu {
namespace {

// torch's registered oneDNN linear ops, looked up once. Absent in builds without oneDNN.
struct OneDnnOps {
  std::optional<c10::OperatorHandle> reorder;  // mkldnn::_reorder_linear_weight(Tensor, int?)
  std::optional<c10::OperatorHandle> linear;   // mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algo?)
  bool bf16 = false;  // torch.ops.mkldnn._is_mkldnn_bf16_supported(): oneDNN has a native bf16 path here

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
      return;
    }
    // Asked once, at run time: on a CPU without bf16 support (no AVX512-BF16/AMX, nor AVX-512 core for
    // oneDNN to emulate it), bfloat16 GEMMs go to at::mm instead, which is correct everywhere.
    if (const auto check = dispatcher.findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""})) {
      torch::jit::Stack stack;
      check->callBoxed(&stack);
      bf16 = stack.at(0).toBool();
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
  const auto st = weight.scalar_type();
  return (st == at::kFloat || (st == at::kBFloat16 && onednn_ops().bf16)) && weight.device().is_cpu() &&
         onednn_ops().available() && weight.numel() > 0 && rows > 0 &&
         rows * weight.numel() >= kOneDnnMinMacs;
}

// The AVX-512 micro-kernel (small_gemm.h) for fp32 weights whose transpose fits in L1/L2 and per-step
// products below the size where BLAS would split a GEMM across threads (the same 2^22 multiply-adds
// under which the time loop runs in per-thread row bands instead). SEQFAST_DISABLE_SMALL_GEMM=1 turns
// it off (small_gemm_enabled). It packs W into column panels once per call (~5-10 us at 16K elements), which
// only pays when the call runs enough rows through it: not for a one-step cell call (measured: LSTMCell
// B=1 H=64 went from 29 to 42 us with the per-call copy).
constexpr int64_t kSmallGemmMaxWeight = 16384;
constexpr int64_t kSmallGemmMaxStepMacs = int64_t(1) << 22;
constexpr int64_t kSmallGemmMinTotalRows = 16;

bool use_small_gemm(const at::Tensor& weight, int64_t max_rows, int64_t total_rows) {
  return weight.scalar_type() == at::kFloat && weight.device().is_cpu() && small_gemm_enabled() &&
         weight.numel() <= kSmallGemmMaxWeight &&
         max_rows * weight.numel() <= kSmallGemmMaxStepMacs && total_rows >= kSmallGemmMinTotalRows;
}

bool unit_column_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// Products of at most 2^14 multiply-adds (a one-step cell at B=1 up to H ~ 64): one dot product per
// output along the rows of W as stored, with no ATen GEMM call. at::addmm/at::mm cost 2.5-5 us of
// dispatch there for well under a microsecond of arithmetic (profile in benchmarks/NOTES.md 13).
constexpr int64_t kTinyMaxMacs = int64_t(1) << 14;

bool use_tiny(const at::Tensor& weight, int64_t rows) {
  const auto st = weight.scalar_type();
  return (st == at::kFloat || st == at::kDouble) && weight.device().is_cpu() && rows > 0 &&
         rows * weight.numel() <= kTinyMaxMacs && unit_column_stride(weight);
}

// out[r, j] (+)= bias[j] + a[r, :] . w[j, :] for r < rows, j < n; every matrix row-major, unit
// column stride.
template <typename T>
SEQFAST_CPU_MULTIVERSION void tiny_gemm(int64_t rows, int64_t n, int64_t k, const T* a, int64_t lda,
                                        const T* w, int64_t ldw, const T* bias, T* out, int64_t ldo,
                                        bool accumulate) {
  thread_local std::vector<T> products;
  if (static_cast<int64_t>(products.size()) < n) products.resize(n);
  T* __restrict dots = products.data();
  for (int64_t r = 0; r < rows; ++r) {
    dot_rows(a + r * lda, w, n, k, dots, ldw);
    T* __restrict out_r = out + r * ldo;
    for (int64_t j = 0; j < n; ++j) {
      out_r[j] = (accumulate ? out_r[j] : T(0)) + (bias != nullptr ? bias[j] : T(0)) + dots[j];
    }
  }
}

// out = a @ weight^T (+ bias) through tiny_gemm; false (nothing done) unless the operands qualify.
bool try_tiny_gemm(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& out, bool accumulate) {
  if (!use_tiny(weight, a.size(0)) || !unit_column_stride(a) || !unit_column_stride(out) ||
      a.scalar_type() != weight.scalar_type() || out.scalar_type() != weight.scalar_type() ||
      (bias.defined() && (bias.scalar_type() != weight.scalar_type() || !bias.is_contiguous()))) {
    return false;
  }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "tiny_gemm", [&] {
    tiny_gemm<scalar_t>(a.size(0), weight.size(0), weight.size(1), a.data_ptr<scalar_t>(), a.stride(0),
                        weight.data_ptr<scalar_t>(), weight.stride(0),
                        bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                        out.stride(0), accumulate);
  });
  return true;
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  if (use_onednn(weight, x.size(0))) {
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    return onednn_linear(x.contiguous(), onednn_reorder(weight, x.size(0)), b);
  }
  // The result into a pooled buffer (buffers.h): it is written once per call, so a fresh one faults
  // all its pages.
  at::Tensor out = empty_buffer({x.size(0), weight.size(0)}, x.options());
  if (use_small_gemm(weight, x.size(0), x.size(0)) && unit_column_stride(x)) {
    // A small weight over many rows (the seed-stock input projection: 3535 x 5 by 5 x 40): RowGemm's
    // micro-kernel on row chunks in parallel, where MKL's 2-thread sgemm took ~11 us for 0.7 M
    // multiply-adds. The bias, if any, is written first and accumulated onto.
    const RowGemm gemm(weight, x.size(0), x.size(0));  // packs W for the micro-kernel (use_small_gemm)
    const int64_t n = weight.size(0);
    if (bias.has_value()) out.copy_(bias->expand({x.size(0), n}));
    const float* a = x.data_ptr<float>();
    float* c = out.data_ptr<float>();
    at::parallel_for(0, x.size(0), 512, [&](int64_t r0, int64_t r1) {
      gemm.compute_rows(r1 - r0, a + r0 * x.stride(0), x.stride(0), c + r0 * n, n, /*accumulate=*/bias.has_value());
    });
    return out;
  }
  if (use_tiny(weight, x.size(0)) &&
      try_tiny_gemm(x, weight, bias.has_value() ? *bias : at::Tensor(), out, false))
    return out;
  return bias.has_value() ? at::addmm_out(out, *bias, x, weight.t()) : at::mm_out(out, x, weight.t());
}

at::Tensor input_projection(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  if (weight.scalar_type() != at::kBFloat16) return cpu::linear(x, weight, bias);
  if (!bf16_gemm_supports(weight, x.size(0))) {
    // bf16 product (at::mm / oneDNN), widened; the bias (float32 or bf16) added in float32.
    at::Tensor out = cpu::linear(x, weight, std::nullopt).to(at::kFloat);
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  const at::Tensor a = x.contiguous();
  // (N, G*H) float32, tens of MB at the canonical size: huge pages (buffers.h) spare ~10% of a bf16
  // inference call in page faults (perf).
  at::Tensor out = empty_buffer({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  Bf16Gemm(weight).run(a.size(0), a.data_ptr<at::BFloat16>(), a.stride(0), out.data_ptr<float>(),
                       out.stride(0), /*accumulate=*/false, b.defined() ? b.data_ptr<float>() : nullptr);
  return out;
}

RowGemm::RowGemm(const at::Tensor& weight, int64_t max_rows, int64_t total_rows) {
  TORCH_INTERNAL_ASSERT(weight.dim() == 2);
  weight_ = weight;
  weight_t_ = weight.t();
  if (max_rows > 0 && bf16_gemm_supports(weight, total_rows)) {
    bf16_.emplace(weight);
  } else if (max_rows > 0 && use_onednn(weight, total_rows)) {
    packed_ = onednn_reorder(weight, max_rows);
  } else if (max_rows > 0 && use_small_gemm(weight, max_rows, total_rows)) {
    const at::Tensor w = weight.contiguous();
    small_panels_ = at::empty({weight_panels_size(w.size(0), w.size(1))}, w.options());
    pack_weight_panels(w.data_ptr<float>(), w.size(1), nullptr, w.size(0), w.size(1), small_panels_.data_ptr<float>());
  }
}

bool RowGemm::try_small_gemm(const at::Tensor& a, const at::Tensor& out, bool accumulate) const {
  if (!small_panels_.defined() || !unit_column_stride(a) || !unit_column_stride(out)) return false;
  return compute_rows(a.size(0), a.data_ptr<float>(), a.stride(0), out.data_ptr<float>(), out.stride(0), accumulate);
}

bool RowGemm::compute_rows(int64_t rows, const float* a, int64_t lda, float* out, int64_t ldo,
                           bool accumulate) const {
  if (!small_panels_.defined()) return false;
  panel_gemm(rows, weight_.size(0), weight_.size(1), a, lda, small_panels_.data_ptr<float>(), out, ldo, accumulate);
  return true;
}

at::Tensor RowGemm::compute(const at::Tensor& a, const at::Tensor& scratch) {
  if (weight_.scalar_type() == at::kBFloat16) {  // a float32 result, in scratch
    at::Tensor out = scratch.narrow(0, 0, a.size(0));
    compute_into(a, out, /*accumulate=*/false);
    return out;
  }
  if (packed_.defined()) return onednn_linear(a, packed_);
  at::Tensor out = scratch.narrow(0, 0, a.size(0));
  if (!try_small_gemm(a, out, /*accumulate=*/false) &&
      !try_tiny_gemm(a, weight_, at::Tensor(), out, /*accumulate=*/false)) {
    at::mm_out(out, a, weight_t_);
  }
  return out;
}

void RowGemm::compute_into(const at::Tensor& a, const at::Tensor& out, bool accumulate) {
  if (bf16_.has_value() && unit_column_stride(a)) {
    if (out.scalar_type() == at::kFloat && unit_column_stride(out)) {
      bf16_->run(a.size(0), a.data_ptr<at::BFloat16>(), a.stride(0), out.data_ptr<float>(), out.stride(0),
                 accumulate);
      return;
    }
    // A bfloat16 `out` (the projected LSTM output): one rounding of the float32 product.
    at::Tensor y = at::empty({a.size(0), bf16_->n()}, a.options().dtype(at::kFloat));
    bf16_->run(a.size(0), a.data_ptr<at::BFloat16>(), a.stride(0), y.data_ptr<float>(), y.stride(0), false);
    if (accumulate) {
      out.add_(y);
    } else {
      out.copy_(y);
    }
    return;
  }
  if (out.scalar_type() != weight_.scalar_type()) {
    // A float32 `out` for bfloat16 operands (the running state gradients of the bf16 backward): the
    // product comes back in bfloat16 (float32 accumulation inside the GEMM) and is added in float32.
    const at::Tensor y = packed_.defined() ? onednn_linear(a, packed_) : at::mm(a, weight_t_);
    if (accumulate) {
      out.add_(y);
    } else {
      out.copy_(y);
    }
    return;
  }
  if (packed_.defined()) {
    at::Tensor y = onednn_linear(a, packed_);
    if (accumulate) {
      out.add_(y);
    } else {
      out.copy_(y);
    }
  } else if (try_small_gemm(a, out, accumulate) ||
             try_tiny_gemm(a, weight_, at::Tensor(), out, accumulate)) {
    return;
  } else if (accumulate) {
    out.addmm_(a, weight_t_);
  } else {
    auto o = out;
    at::mm_out(o, a, weight_t_);
  }
}

}  // namespace cpu
}  // namespace seqfast
