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

constexpr int kColumns = 32;  // micro-tile columns: two 16-float vectors

// Two layouts of B share one micro-kernel:
// - Strided (small_gemm): B row p at b + p * ldb, the last column block masked on load. Tiles of 6 rows
//   (6 x 2 accumulators + 2 B vectors + 1 broadcast).
// - Panels (panel_gemm): B row p at b + p * 32, zero-padded, so loads need no mask (masked loads kept
//   reloading their masks from the stack, perf); tiles of 8 rows (16 accumulators; a B=64 step is 8
//   full tiles), and the first tile over a k block prefetches the next block (see panel_gemm_avx512).
template <bool Panels>
struct Layout {
  static constexpr int kRows = Panels ? 8 : 6;
};

struct Masks {
  __mmask16 lo, hi;
  explicit Masks(int64_t columns)
      : lo(columns >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << columns) - 1u)),
        hi(columns >= 32   ? __mmask16(0xFFFF)
           : columns <= 16 ? __mmask16(0)
                           : __mmask16((1u << (columns - 16)) - 1u)) {}
};

// One micro-tile: C[0:Rows, 0:columns] (+)= A[0:Rows, :] @ B[:, 0:columns], columns <= 32 (masked).
// next: where to prefetch from (row p of it with row p of B), or nullptr.
template <bool Panels, int Rows>
__attribute__((target("avx512f"), always_inline)) inline void tile(
    const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k, Masks m,
    bool accumulate, const float* next) {
  __m512 acc_lo[Rows], acc_hi[Rows];
  for (int i = 0; i < Rows; ++i) {
    acc_lo[i] = _mm512_setzero_ps();
    acc_hi[i] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    __m512 b_lo, b_hi;
    if constexpr (Panels) {
      if (next != nullptr) {
        _mm_prefetch(reinterpret_cast<const char*>(next + p * kColumns), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + p * kColumns + 16), _MM_HINT_T0);
      }
      b_lo = _mm512_loadu_ps(b + p * kColumns);
      b_hi = _mm512_loadu_ps(b + p * kColumns + 16);
    } else {
      b_lo = _mm512_maskz_loadu_ps(m.lo, b + p * ldb);
      b_hi = _mm512_maskz_loadu_ps(m.hi, b + p * ldb + 16);
    }
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
      acc_lo[i] = _mm512_add_ps(acc_lo[i], _mm512_maskz_loadu_ps(m.lo, c_i));
      acc_hi[i] = _mm512_add_ps(acc_hi[i], _mm512_maskz_loadu_ps(m.hi, c_i + 16));
    }
    _mm512_mask_storeu_ps(c_i, m.lo, acc_lo[i]);
    _mm512_mask_storeu_ps(c_i + 16, m.hi, acc_hi[i]);
  }
}

// A tile of `rest` < R + 1 rows: a chain of row counts R, R - 1, ..., 1, one instantiation each.
template <bool Panels, int R>
__attribute__((target("avx512f"), always_inline)) inline void remainder_tile(
    int64_t rest, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
    Masks masks, bool accumulate, const float* next) {
  if constexpr (R > 0) {
    if (rest == R) {
      tile<Panels, R>(a, lda, b, ldb, c, ldc, k, masks, accumulate, next);
    } else {
      remainder_tile<Panels, R - 1>(rest, a, lda, b, ldb, c, ldc, k, masks, accumulate, next);
    }
  }
}

// Rows [0, m) of one column block: full tiles, then one tile of the remaining rows (a B vector pair
// loaded per k serves all of them; one row at a time, the remainder of a 64-row step ran at a third of
// the full tiles' rate). `next` goes to the first tile only.
template <bool Panels, int Rows = Layout<Panels>::kRows>
__attribute__((target("avx512f"), always_inline)) inline void column_block(
    int64_t m, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
    int64_t columns, bool accumulate, const float* next) {
  const Masks masks(columns);
  int64_t i0 = 0;
  for (; i0 + Rows <= m; i0 += Rows, next = nullptr) {
    tile<Panels, Rows>(a + i0 * lda, lda, b, ldb, c + i0 * ldc, ldc, k, masks, accumulate, next);
  }
  a += i0 * lda;
  c += i0 * ldc;
  remainder_tile<Panels, Rows - 1>(m - i0, a, lda, b, ldb, c, ldc, k, masks, accumulate, next);
}

__attribute__((target("avx512f"))) void small_gemm_avx512(int64_t m, int64_t n, int64_t k,
                                                          const float* a, int64_t lda, const float* b,
                                                          int64_t ldb, float* c, int64_t ldc,
                                                          bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    column_block<false>(m, a, lda, b + j0, ldb, c + j0, ldc, k, std::min<int64_t>(kColumns, n - j0), accumulate,
                        nullptr);
  }
}

// k is split in blocks of kDepth so that the part of a panel the row tiles share (kDepth x 32 floats,
// 16 KiB) stays in L1 while every row tile of the block runs over it; the tiles' partial sums go
// through C. The first tile over a block prefetches the next one (the panels are contiguous, so it is
// the next k block or the next panel's first): from L3 it would otherwise stall that tile's loads, a
// large layer's slice (4 MB at I = H = 512) not fitting in L2. A small batch (fewer rows than a full
// tile) has one tile per block, streaming the weights at the memory's pace: it prefetches a few rows
// ahead instead.
constexpr int64_t kDepth = 128;
constexpr int64_t kPrefetchRows = 16;

__attribute__((target("avx512f"))) void panel_gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a,
                                                          int64_t lda, const float* panels, float* c,
                                                          int64_t ldc, bool accumulate) {
  const bool full_tiles = m >= Layout<true>::kRows;
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    const int64_t columns = std::min<int64_t>(kColumns, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kDepth) {
      const int64_t depth = std::min(kDepth, k - p0);
      const float* b = panels + j0 * k + p0 * kColumns;
      column_block<true>(m, a + p0, lda, b, kColumns, c + j0, ldc, depth, columns, accumulate || p0 > 0,
                         b + (full_tiles ? depth : kPrefetchRows) * kColumns);
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

int64_t weight_panels_size(int64_t n, int64_t k) { return (n + kColumns - 1) / kColumns * kColumns * k; }

void pack_weight_panels(const float* w, int64_t ldw, const int64_t* rows, int64_t n, int64_t k, float* panels) {
  // Blocks of 16 k: the 32 source rows' cache lines are read once each, and the block's 16 panel rows
  // (2 KiB) stay in L1 while they are written column by column.
  constexpr int64_t kBlock = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    float* panel = panels + j0 * k;
    const int64_t columns = std::min<int64_t>(kColumns, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kBlock) {
      const int64_t p1 = std::min(k, p0 + kBlock);
      for (int64_t j = 0; j < kColumns; ++j) {
        if (j < columns) {
          const float* w_row = w + (rows != nullptr ? rows[j0 + j] : j0 + j) * ldw;
          for (int64_t p = p0; p < p1; ++p) panel[p * kColumns + j] = w_row[p];
        } else {
          for (int64_t p = p0; p < p1; ++p) panel[p * kColumns + j] = 0.0f;
        }
      }
    }
  }
}

void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(small_gemm_available());
  panel_gemm_avx512(m, n, k, a, lda, panels, c, ldc, accumulate);
}

#else  // not x86-64 GCC/clang: never available

int64_t weight_panels_size(int64_t, int64_t) { return 0; }
void pack_weight_panels(const float*, int64_t, const int64_t*, int64_t, int64_t, float*) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: panel_gemm is not available in this build");
}
void panel_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: panel_gemm is not available in this build");
}

bool small_gemm_available() { return false; }

void small_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: small_gemm is not available in this build");
}

#endif

}  // namespace cpu
}  // namespace seqfast
