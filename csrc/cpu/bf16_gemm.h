#pragma once
// bfloat16 GEMM with a float32 result, for the bf16 recurrent loops: C (M, n) (+)= A (M, k) @ W^T (+ bias)
// with A and W in bfloat16, C and bias in float32. It keeps what the recurrent kernels need in float32
// (gate pre-activations, the running state gradients) unrounded, which at::mm and oneDNN's matmul
// through torch's ops (bfloat16 in, bfloat16 out) cannot.
//
// Built on torch's exported batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm, the one
// torch's CPU flash attention uses: oneDNN's ukernel, AMX or AVX512-BF16), with W^T packed once per call
// into VNNI column blocks. Measured here (Xeon with AMX, 2 threads, machine shared): 700-1100 GF/s at
// 64x512x2048 against ~400 for oneDNN's matmul in bf16 (benchmarks/NOTES.md 15). Available only where
// torch says the CPU can run it (cpublas::could_pack, asked at run time); elsewhere the callers use
// at::mm in bfloat16, which is correct on any CPU.
#include <ATen/ATen.h>

namespace seqfast {
namespace cpu {

// Whether this CPU and torch build run the bf16 micro-kernel (and SEQFAST_DISABLE_BRGEMM is not set).
bool bf16_gemm_available();

// Whether Bf16Gemm takes this (n, k) bfloat16 weight for a call that runs `total_rows` rows through it:
// the micro-kernel is available, k is even (the VNNI layout pairs k; oneDNN refuses to pack an odd k:
// "could not create a BRGeMM ukernel packing B object"), and enough rows pay for packing the weight
// (~3 ns per element: an LSTMCell step at B=1, H=256 under autocast took 2.1 ms with it, 0.55 ms
// without; per row the micro-kernel saves ~0.01 ns per weight element over at::mm, so >= 256 rows).
bool bf16_gemm_supports(const at::Tensor& weight, int64_t total_rows);

class Bf16Gemm {
 public:
  // weight: (n, k) bfloat16, any strides, as bf16_gemm_supports allows. Packs W^T once.
  explicit Bf16Gemm(const at::Tensor& weight);

  // c[r, :] (+)= a[r, :] @ W^T (+ bias) for r < rows. a: bf16 rows lda apart; c: float32 rows ldc apart;
  // bias: n floats or nullptr. Parallel over column blocks (a no-op split inside a parallel region).
  void run(int64_t rows, const at::BFloat16* a, int64_t lda, float* c, int64_t ldc, bool accumulate,
           const float* bias = nullptr) const;

  int64_t n() const { return n_; }
  int64_t k() const { return k_; }

 private:
  int64_t n_, k_, n_pad_ = 0;  // n_pad_: n rounded up to the 16 columns oneDNN packs
  at::Tensor packed_;  // (blocks, k * 32) bfloat16, column block b of W^T in VNNI layout
};

}  // namespace cpu
}  // namespace seqfast
