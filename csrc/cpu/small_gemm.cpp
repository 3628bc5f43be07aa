// See small_gemm.h. Written with AVX-512 intrinsics because the same loops in plain C++ (omp simd over
// a fixed-size accumulator array) ran at 12-22 GF/s: GCC did not keep the accumulator tile in
// registers (benchmarks/NOTES.md 12). This file is the only place with intrinsics; the function is
// compiled for AVX-512F only and small_gemm_available() gates every call.
#include "small_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SEQFAST_SMALL_GEMM_X86 1
#else
#define SEQFAST_SMALL_GEMM_X86 0
#endif

namespace seqfast {
namespace cpu {

#if SEQFAST_SMALL_GEMM_X86
namespace {

constexpr int kRows = 6;      // micro-tile rows: 6 x 2 accumulators + 2 B vectors + 1 broadcast
constexpr int kColumns = 32;  // micro-tile columns: two 16-float vectors

// One micro-tile: C[0:Rows, 0:columns] (+)= A[0:Rows, :] @ B[:, 0:columns], columns <= 32 (masked).
template <int Rows>
__attribute__((target("avx512f"), always_inline)) inline void tile(
    const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
    int64_t columns, bool accumulate) {
  const __mmask16 lo = columns >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << columns) - 1u);
  const __mmask16 hi = columns >= 32   ? __mmask16(0xFFFF)
                       : columns <= 16 ? __mmask16(0)
                                       : __mmask16((1u << (columns - 16)) - 1u);
  __m512 acc_lo[Rows], acc_hi[Rows];
  for (int i = 0; i < Rows; ++i) {
    acc_lo[i] = _mm512_setzero_ps();
    acc_hi[i] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b_lo = _mm512_maskz_loadu_ps(lo, b + p * ldb);
    const __m512 b_hi = _mm512_maskz_loadu_ps(hi, b + p * ldb + 16);
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      const __m512 a_ip = _mm512_set1_ps(a[i * lda + p]);
      acc_lo[i] = _mm512_fmadd_ps(a_ip, b_lo, acc_lo[i]);
      acc_hi[i] = _mm512_fmadd_ps(a_ip, b_hi, acc_hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
    float* c_i = c + i * ldc;
    if (accumulate) {
      acc_lo[i] = _mm512_add_ps(acc_lo[i], _mm512_maskz_loadu_ps(lo, c_i));
      acc_hi[i] = _mm512_add_ps(acc_hi[i], _mm512_maskz_loadu_ps(hi, c_i + 16));
    }
    _mm512_mask_storeu_ps(c_i, lo, acc_lo[i]);
    _mm512_mask_storeu_ps(c_i + 16, hi, acc_hi[i]);
  }
}

__attribute__((target("avx512f"))) void small_gemm_avx512(int64_t m, int64_t n, int64_t k,
                                                          const float* a, int64_t lda, const float* b,
                                                          int64_t ldb, float* c, int64_t ldc,
                                                          bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    const int64_t columns = std::min<int64_t>(kColumns, n - j0);
    int64_t i0 = 0;
    for (; i0 + kRows <= m; i0 += kRows) {
      tile<kRows>(a + i0 * lda, lda, b + j0, ldb, c + i0 * ldc + j0, ldc, k, columns, accumulate);
    }
    for (; i0 < m; ++i0) {
      tile<1>(a + i0 * lda, lda, b + j0, ldb, c + i0 * ldc + j0, ldc, k, columns, accumulate);
    }
  }
}

}  // namespace

bool small_gemm_available() {
  static const bool available = __builtin_cpu_supports("avx512f");
  return available;
}

void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(small_gemm_available());
  small_gemm_avx512(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

#else  // not x86-64 GCC/clang: never available

bool small_gemm_available() { return false; }

void small_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: small_gemm is not available in this build");
}

#endif

}  // namespace cpu
}  // namespace seqfast
