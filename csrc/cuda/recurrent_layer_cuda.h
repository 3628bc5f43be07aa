#pragma once
// Host side of the CUDA recurrent layers, shared by recurrent_layer_kernel.cu (forward + registration)
// and recurrent_layer_backward.cu. Two files so that ninja compiles them in parallel.
//
// Structure (haste's; the same as the CPU kernels in csrc/cpu/recurrent_layer_kernel.cpp):
//   forward:  gx = x W_ih^T for all N tokens (one GEMM); per step gh = h W_hh^T (one GEMM on the
//             step's rows) and ONE fused pointwise kernel (recurrent_layer_pointwise.cu, which calls
//             include/seqfast/gates.h) that adds the biases, applies the cell and saves the workspace
//             (same layout as the CPU's: include/seqfast/recurrent.h).
//   backward: per step one fused pointwise kernel and one GEMM (dh_prev = dG W_hh); the gradients of x,
//             W_ih, W_hh, W_hr and the biases are single GEMMs / reductions after the loop.
// Everything runs on PyTorch's current stream; batch_sizes is read on the host once, before the loop,
// so the loop never synchronizes with the device.
//
// float16/bfloat16: the GEMM operands are in the input dtype (tensor cores), the GEMM results that
// feed the pointwise kernels (gx, gh, dh W_hh) are float32 (at::mm with out_dtype; cuBLAS accumulates
// in float32 either way), and so are the LSTM cell state and the running state gradients.
//
// NOT YET RUN ON A GPU: compile-checked only (see the README).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>
#include <type_traits>

#include "seqfast/recurrent_args.h"

namespace seqfast {
namespace cuda {

inline void check_cuda_dtype(const at::Tensor& input) {
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "seqfast: the CUDA kernels support float32, float64, float16 and bfloat16, got ", st);
  TORCH_CHECK(input.is_cuda(), "seqfast: expected a CUDA input, got one on ", input.device());
}

// out (rows, cols) in at::opmath_type<T> = a (rows, k) @ b (k, cols), a and b in T.
template <typename T>
void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, at::kFloat);  // aten::mm.dtype_out: fp16/bf16 operands, fp32 result
  }
}

template <typename T>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<at::opmath_type<T>>::value);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_layer_forward_cuda(
    const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx, const OptTensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, int64_t mode, bool reverse, bool training);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
recurrent_layer_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                              const OptTensor& grad_cy, const at::Tensor& input,
                              const OptTensor& batch_sizes, const at::Tensor& hx, const OptTensor& cx,
                              const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                              const OptTensor& b_hh, const OptTensor& w_hr, const at::Tensor& output,
                              const at::Tensor& workspace, int64_t mode, bool reverse,
                              bool input_grad);

}  // namespace cuda
}  // namespace seqfast
