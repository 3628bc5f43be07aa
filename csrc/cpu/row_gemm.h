#pragma once
// The per-time-step GEMM of the recurrent loops: out[0:rows] = a[0:rows] @ W^T for one fixed weight W
// (n, k), called T times with a shrinking or constant number of rows.
//
// Small fp32 weights (W^T up to 16K elements, per-step products under 2^22 multiply-adds) use the
// AVX-512 micro-kernel of small_gemm.h where the CPU has it.
// Larger fp32 uses oneDNN's matmul on a weight reordered once into its blocked layout (torch's registered
// mkldnn::_reorder_linear_weight / mkldnn::_linear_pointwise, the ops torch.compile's CPU backend uses):
// on the AVX-512 EPYC we measure 195-219 GF/s at 64x512x2048 and ~180 GF/s at 4x1024x4096, against
// 140-150 and 22-24 GF/s for at::mm (MKL). float64, and torch builds without oneDNN, use at::mm.
// bfloat16 (operands and result in bf16, float32 accumulation inside the GEMM) uses oneDNN the same way
// when torch reports native bf16 support (mkldnn::_is_mkldnn_bf16_supported, asked at run time), else
// at::mm, which is correct on any CPU (benchmarks/NOTES.md 15).
#include <ATen/ATen.h>

#include <optional>

#include "bf16_gemm.h"

namespace seqfast {
namespace cpu {

class RowGemm {
 public:
  // weight: (n, k), any strides. max_rows: the largest `rows` that will be passed (oneDNN tunes the
  // reordered layout for it; smaller row counts work too). total_rows: the rows summed over all the
  // calls to come, which decides whether reordering the weight for oneDNN pays for itself.
  RowGemm(const at::Tensor& weight, int64_t max_rows, int64_t total_rows);

  // a: (rows, k) contiguous. Returns a @ W^T, (rows, n) contiguous, in the compute type (float32 for a
  // bfloat16 W): a fresh tensor from oneDNN, or the first `rows` rows of `scratch` ((>= rows, n) in the
  // compute type). Calls from several threads are safe with one scratch per thread.
  at::Tensor compute(const at::Tensor& a, const at::Tensor& scratch);

  // out (rows, n), contiguous rows: out = a @ W^T, or out += a @ W^T when accumulate is set. out may be
  // float32 for bfloat16 operands (the product is converted).
  void compute_into(const at::Tensor& a, const at::Tensor& out, bool accumulate);

  bool uses_onednn() const { return packed_.defined(); }

  // out (rows, n; rows ldo apart) (+)= a (rows, k; rows lda apart) @ W^T through the small-GEMM
  // micro-kernel on raw pointers, when this RowGemm packed W for it (small float32 weights); false,
  // with nothing done, otherwise. Spares compute/compute_into's tensor views in the per-step loops.
  bool compute_rows(int64_t rows, const float* a, int64_t lda, float* out, int64_t ldo, bool accumulate) const;

 private:
  // The small-GEMM micro-kernel, when chosen and the operands have unit column stride; false if not.
  bool try_small_gemm(const at::Tensor& a, const at::Tensor& out, bool accumulate) const;

  at::Tensor weight_;          // (n, k) W as given (the tiny-product dot-product path reads its rows)
  at::Tensor weight_t_;        // (k, n) view of W^T for at::mm
  at::Tensor packed_;          // oneDNN-blocked W, when available
  at::Tensor small_panels_;    // W^T packed for panel_gemm, for small fp32 weights (small_gemm.h)
  std::optional<Bf16Gemm> bf16_;  // bfloat16 W where the bf16 micro-kernel runs (bf16_gemm.h)
};

// x W^T + bias for all the tokens of a layer (the input projection), in the compute type: float32 for
// bfloat16 x and W (float32 accumulation and result, bias added in float32), else linear().
at::Tensor input_projection(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias);

// x W^T + bias for x (M, k), weight (n, k), bias (n) or undefined: the one-shot GEMMs around the time
// loop (the input projection of all steps, the input gradient). fp32 goes through oneDNN when large
// enough (its matmul beat at::addmm by ~1.3x at 6400x512x2048 here, reorder included), else at::addmm.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace seqfast
