#pragma once
// Dot products of one vector with several rows, for the CPU kernels that need them (the attention
// scores, the tiny-product path of row_gemm.cpp). Inline: they are compiled for the target of the
// multiversioned function that calls them.
#include <cstdint>

#include "multiversion.h"

namespace seqfast {
namespace cpu {

// a . b over n elements. `omp simd reduction` lets the compiler reassociate the sum (we build without
// -ffast-math), which is what makes it vectorize.
template <typename T>
SEQFAST_CPU_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

// out[j] = x . rows[j] for rows j < n of D elements each, `ld` elements apart (default: D, a dense
// (n, D) block). Four rows at a time: four independent accumulator chains hide the FMA latency a
// single dot product is bound by, and x is loaded once for the four.
template <typename T>
SEQFAST_CPU_INLINE void dot_rows(const T* __restrict x, const T* __restrict rows, int64_t n, int64_t D,
                                 T* __restrict out, int64_t ld = -1) {
  if (ld < 0) ld = D;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* __restrict r0 = rows + j * ld;
    const T* __restrict r1 = r0 + ld;
    const T* __restrict r2 = r1 + ld;
    const T* __restrict r3 = r2 + ld;
    T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < D; ++k) {
      const T xk = x[k];
      s0 += xk * r0[k];
      s1 += xk * r1[k];
      s2 += xk * r2[k];
      s3 += xk * r3[k];
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
  }
  for (; j < n; ++j) out[j] = dot(x, rows + j * ld, D);
}

}  // namespace cpu
}  // namespace seqfast
