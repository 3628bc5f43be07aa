#pragma once
// A register-blocked float32 GEMM on a weight packed into column panels, for the per-step products of
// the recurrent layers: the tiny ones of small layers (row bands), where MKL runs at 7-12 GF/s and its
// call overhead rivals the work (benchmarks/NOTES.md 8 and 12), and the per-thread slices of the
// unit-split time loop (recurrent_layer_kernel.cpp), whose weights are packed once per call where
// MKL's sgemm copies B on every call (5% of an nmt-enc LSTM inference, perf).
#include <cstdint>

namespace seqfast {
namespace cpu {

// True when this build and this CPU can run panel_gemm (x86-64 with AVX-512F).
bool small_gemm_available();
// Available and not turned off by SEQFAST_DISABLE_SMALL_GEMM=1 (read per call: the tests compare both
// paths in one process): whether RowGemm and the layer backward use these kernels.
bool small_gemm_enabled();

// Panel p holds columns [32p, 32p + 32) of W^T as k rows of 32 contiguous floats (zero past n), so the
// kernel streams each panel sequentially (from L1/L2 for small layers, from the core's own L2 or L3
// for a split slice).
int64_t weight_panels_size(int64_t n, int64_t k);  // floats
// Rows rows[0..n) of W (row-major, rows ldw apart; rows == nullptr: rows 0..n) -> panels of their W^T.
void pack_weight_panels(const float* w, int64_t ldw, const int64_t* rows, int64_t n, int64_t k, float* panels);
// C (m x n, rows ldc apart) (+)= A (m x k, rows lda apart) @ W^T.
void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                int64_t ldc, bool accumulate);
// C (n x k, rows ldc apart) += G^T A for G (m x n, rows ldg apart) and A (m x k, rows lda apart), and
// bias (n) += the column sums of G when bias is not null: a layer's weight (and bias) gradient summed
// over m token rows. Single-threaded; callers split the rows.
void gradient_gemm(int64_t m, int64_t n, int64_t k, const float* g, int64_t ldg, const float* a, int64_t lda,
                   float* c, int64_t ldc, float* bias);

}  // namespace cpu
}  // namespace seqfast
