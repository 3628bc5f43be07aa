#pragma once
// A register-blocked float32 GEMM for the tiny per-step products of small recurrent layers, where
// MKL runs at 7-12 GF/s and its call overhead rivals the work (benchmarks/NOTES.md 8 and 12).
#include <cstdint>

namespace seqfast {
namespace cpu {

// True when this build and this CPU can run small_gemm (x86-64 with AVX-512F).
bool small_gemm_available();

// C (m x n, rows ldc apart) = A (m x k, rows lda apart) @ B (k x n, rows ldb apart), or C += A @ B when
// accumulate. All row-major with unit column stride. Single-threaded; meant for k*n up to ~16K
// elements (B stays in L1/L2); it has no cache blocking for larger B.
void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                int64_t ldb, float* c, int64_t ldc, bool accumulate);

// The same micro-kernel on a weight packed once into column panels, for the per-thread slices of the
// unit-split time loop (recurrent_layer_kernel.cpp), whose weights are far larger than small_gemm's:
// panel p holds columns [32p, 32p + 32) of W^T as k rows of 32 contiguous floats (zero past n), so the
// kernel streams each panel sequentially from the core's own L2, with no per-call packing (MKL's sgemm
// copies B on every call: 5% of an nmt-enc LSTM inference, perf).
int64_t weight_panels_size(int64_t n, int64_t k);  // floats
// Rows rows[0..n) of W (row-major, rows ldw apart; rows == nullptr: rows 0..n) -> panels of their W^T.
void pack_weight_panels(const float* w, int64_t ldw, const int64_t* rows, int64_t n, int64_t k, float* panels);
// C (m x n, rows ldc apart) (+)= A (m x k, rows lda apart) @ W^T.
void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                int64_t ldc, bool accumulate);

}  // namespace cpu
}  // namespace seqfast
