// See small_gemm.h. Written with AVX-512 intrinsics because the same loops in plain C++ (omp simd over
// a fixed-size accumulator array) ran at 12-22 GF/s: GCC did not keep the accumulator tile in
// registers (benchmarks/NOTES.md 12). This file is the only place with intrinsics; the function is
// compiled for AVX-512F only and small_gemm_available() gates every call.
#include "small_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

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

// B is packed in column panels (see small_gemm.h): row p of a panel at b + p * 32, zero-padded, so its
// loads need no mask (masked loads kept reloading their masks from the stack, perf). Tiles of 8 rows
// (16 accumulators + 2 B vectors + 1 broadcast; a B=64 step is 8 full tiles, a row band of 16 two),
// and the first tile over a k block prefetches the next block (see panel_gemm_avx512). A strided-B
// variant with 6-row tiles served the row-banded small layers until the panels replaced it there too
// (LSTM small inference 0.96x the time; NOTES 19).
constexpr int kRows = 8;

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
template <int Rows>
__attribute__((target("avx512f"), always_inline)) inline void tile(
    const float* a, int64_t lda, const float* b, float* c, int64_t ldc, int64_t k, Masks m,
    bool accumulate, const float* next) {
  __m512 acc_lo[Rows], acc_hi[Rows];
  for (int i = 0; i < Rows; ++i) {
    acc_lo[i] = _mm512_setzero_ps();
    acc_hi[i] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    if (next != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next + p * kColumns), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + p * kColumns + 16), _MM_HINT_T0);
    }
    const __m512 b_lo = _mm512_loadu_ps(b + p * kColumns);
    const __m512 b_hi = _mm512_loadu_ps(b + p * kColumns + 16);
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
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void remainder_tile(
    int64_t rest, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, int64_t k,
    Masks masks, bool accumulate, const float* next) {
  if constexpr (R > 0) {
    if (rest == R) {
      tile<R>(a, lda, b, c, ldc, k, masks, accumulate, next);
    } else {
      remainder_tile<R - 1>(rest, a, lda, b, c, ldc, k, masks, accumulate, next);
    }
  }
}

// Rows [0, m) of one column block: full tiles, then one tile of the remaining rows (a B vector pair
// loaded per k serves all of them; one row at a time, the remainder of a 64-row step ran at a third of
// the full tiles' rate). `next` goes to the first tile only.
__attribute__((target("avx512f"), always_inline)) inline void column_block(
    int64_t m, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, int64_t k,
    int64_t columns, bool accumulate, const float* next) {
  const Masks masks(columns);
  int64_t i0 = 0;
  for (; i0 + kRows <= m; i0 += kRows, next = nullptr) {
    tile<kRows>(a + i0 * lda, lda, b, c + i0 * ldc, ldc, k, masks, accumulate, next);
  }
  a += i0 * lda;
  c += i0 * ldc;
  remainder_tile<kRows - 1>(m - i0, a, lda, b, c, ldc, k, masks, accumulate, next);
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
  const bool full_tiles = m >= kRows;
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    const int64_t columns = std::min<int64_t>(kColumns, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kDepth) {
      const int64_t depth = std::min(kDepth, k - p0);
      const float* b = panels + j0 * k + p0 * kColumns;
      column_block(m, a + p0, lda, b, c + j0, ldc, depth, columns, accumulate || p0 > 0,
                         b + (full_tiles ? depth : kPrefetchRows) * kColumns);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// gradient_gemm (small_gemm.h): C (n x k) += G^T A over m token rows, with the reduction over the
// tokens as the inner loop. A tile holds KD <= 8 columns of A (k) by V <= 3 vectors of 16 columns of G
// (n) in 24 accumulators; per token it loads V vectors of G's row, broadcasts KD values of A's row and
// does KD * V FMAs, so it runs near the FMA rate whatever m is (one core: 119-121 GF/s at n = 40, k = 5
// or 10; 63 at n = k = 10), where MKL's sgemm for these tall, thin products (m = 3535, n = 40, k = 5 or
// 10: the weight gradients of the seed-stock LSTM) ran at 36-78 GF/s and was ~12% of its training
// step (its k-blocked OpenMP split included).
constexpr int kGradVectors = 3;
constexpr int kGradDepth = 8;

template <int KD, int V>
__attribute__((target("avx512f"), always_inline)) inline void gradient_tile(
    int64_t m, const float* g, int64_t ldg, const float* a, int64_t lda, int64_t columns, float* c,
    int64_t ldc, float* bias) {
  __mmask16 mask[V];
  for (int v = 0; v < V; ++v) {
    const int64_t in_vector = std::max<int64_t>(0, std::min<int64_t>(16, columns - 16 * v));
    mask[v] = in_vector == 16 ? __mmask16(0xFFFF) : __mmask16((1u << in_vector) - 1u);
  }
  __m512 acc[KD][V], sum[V];
  for (int v = 0; v < V; ++v) {
    sum[v] = _mm512_setzero_ps();
    for (int kk = 0; kk < KD; ++kk) acc[kk][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < m; ++i) {
    __m512 gv[V];
    for (int v = 0; v < V; ++v) gv[v] = _mm512_maskz_loadu_ps(mask[v], g + i * ldg + 16 * v);
    if (bias != nullptr) {
      for (int v = 0; v < V; ++v) sum[v] = _mm512_add_ps(sum[v], gv[v]);
    }
#pragma GCC unroll 8
    for (int kk = 0; kk < KD; ++kk) {
      const __m512 av = _mm512_set1_ps(a[i * lda + kk]);
      for (int v = 0; v < V; ++v) acc[kk][v] = _mm512_fmadd_ps(av, gv[v], acc[kk][v]);
    }
  }
  // C is (n x k): column kk of the tile is strided by ldc there, so the tile goes through a buffer.
  alignas(64) float tile[KD][16 * V];
  for (int kk = 0; kk < KD; ++kk) {
    for (int v = 0; v < V; ++v) _mm512_store_ps(tile[kk] + 16 * v, acc[kk][v]);
  }
  for (int64_t j = 0; j < columns; ++j) {
    for (int kk = 0; kk < KD; ++kk) c[j * ldc + kk] += tile[kk][j];
  }
  if (bias != nullptr) {
    for (int v = 0; v < V; ++v) {
      _mm512_mask_storeu_ps(bias + 16 * v, mask[v],
                            _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], bias + 16 * v), sum[v]));
    }
  }
}

template <int KD>
__attribute__((target("avx512f"), always_inline)) inline void gradient_tile_vectors(
    int64_t m, const float* g, int64_t ldg, const float* a, int64_t lda, int64_t columns, float* c,
    int64_t ldc, float* bias) {
  if (columns > 32) {
    gradient_tile<KD, 3>(m, g, ldg, a, lda, columns, c, ldc, bias);
  } else if (columns > 16) {
    gradient_tile<KD, 2>(m, g, ldg, a, lda, columns, c, ldc, bias);
  } else {
    gradient_tile<KD, 1>(m, g, ldg, a, lda, columns, c, ldc, bias);
  }
}

// A tile of depth < KD + 1: one instantiation per depth (see remainder_tile).
template <int KD>
__attribute__((target("avx512f"), always_inline)) inline void gradient_tile_depth(
    int64_t depth, int64_t m, const float* g, int64_t ldg, const float* a, int64_t lda, int64_t columns,
    float* c, int64_t ldc, float* bias) {
  if constexpr (KD > 0) {
    if (depth == KD) {
      gradient_tile_vectors<KD>(m, g, ldg, a, lda, columns, c, ldc, bias);
    } else {
      gradient_tile_depth<KD - 1>(depth, m, g, ldg, a, lda, columns, c, ldc, bias);
    }
  }
}

__attribute__((target("avx512f"))) void gradient_gemm_avx512(int64_t m, int64_t n, int64_t k, const float* g,
                                                             int64_t ldg, const float* a, int64_t lda, float* c,
                                                             int64_t ldc, float* bias) {
  for (int64_t j0 = 0; j0 < n; j0 += 16 * kGradVectors) {
    const int64_t columns = std::min<int64_t>(16 * kGradVectors, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kGradDepth) {
      const int64_t depth = std::min<int64_t>(kGradDepth, k - p0);
      // The column sums ride along with the first depth block of each column block.
      float* bias_block = bias != nullptr && p0 == 0 ? bias + j0 : nullptr;
      gradient_tile_depth<kGradDepth>(depth, m, g + j0, ldg, a + p0, lda, columns, c + j0 * ldc + p0, ldc,
                                      bias_block);
    }
  }
}

}  // namespace

bool small_gemm_available() {
  static const bool available = __builtin_cpu_supports("avx512f");
  return available;
}


int64_t weight_panels_size(int64_t n, int64_t k) { return (n + kColumns - 1) / kColumns * kColumns * k; }

namespace {

// out[c] = column c of the 16 x 16 block in[0..16) (in[r] = row r), by three shuffle stages: pairs of
// rows interleaved, then 4-row groups within each 128-bit lane, then the lanes across the groups.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);  // lane L: (i,4L) (i+1,4L) (i,4L+1) (i+1,4L+1)
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // the same for columns 4L+2, 4L+3
  }
  for (int i = 0; i < 16; i += 4) {  // u[i+m], lane L: column 4L+m of rows i..i+3
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {  // column 4L+m: lane L of u[m], u[4+m], u[8+m], u[12+m]
    const __m512 even_lo = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);  // lanes 0, 2 of each
    const __m512 even_hi = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 odd_lo = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);  // lanes 1, 3 of each
    const __m512 odd_hi = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    r[m] = _mm512_shuffle_f32x4(even_lo, even_hi, 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(even_lo, even_hi, 0xDD);
    r[4 + m] = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0xDD);
  }
}

// The panels as 16 x 16 register transposes: each source row is read 64 bytes at a time and each
// panel row written 64 bytes at a time (the scalar loop this replaces moved one float per load/store:
// 23.6% of a T = 1 nmt-enc LSTM call, perf).
__attribute__((target("avx512f"))) void pack_weight_panels_avx512(const float* w, int64_t ldw,
                                                                 const int64_t* rows, int64_t n, int64_t k,
                                                                 float* panels) {
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    float* panel = panels + j0 * k;
    for (int64_t half = 0; half < kColumns; half += 16) {
      const int64_t columns = std::max<int64_t>(0, std::min<int64_t>(16, n - j0 - half));
      const float* src[16];
      for (int64_t j = 0; j < columns; ++j) {
        const int64_t row = j0 + half + j;
        src[j] = w + (rows != nullptr ? rows[row] : row) * ldw;
      }
      for (int64_t p0 = 0; p0 < k; p0 += 16) {
        const int64_t depth = std::min<int64_t>(16, k - p0);
        const __mmask16 mask = depth == 16 ? __mmask16(0xFFFF) : __mmask16((1u << depth) - 1u);
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j)  // missing columns are the panel's zero padding
          r[j] = j < columns ? _mm512_maskz_loadu_ps(mask, src[j] + p0) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t p = 0; p < depth; ++p) _mm512_storeu_ps(panel + (p0 + p) * kColumns + half, r[p]);
      }
    }
  }
}

}  // namespace

void pack_weight_panels(const float* w, int64_t ldw, const int64_t* rows, int64_t n, int64_t k, float* panels) {
  TORCH_INTERNAL_ASSERT(small_gemm_available());
  pack_weight_panels_avx512(w, ldw, rows, n, k, panels);
}

void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(small_gemm_available());
  panel_gemm_avx512(m, n, k, a, lda, panels, c, ldc, accumulate);
}

void gradient_gemm(int64_t m, int64_t n, int64_t k, const float* g, int64_t ldg, const float* a, int64_t lda,
                   float* c, int64_t ldc, float* bias) {
  TORCH_INTERNAL_ASSERT(small_gemm_available());
  gradient_gemm_avx512(m, n, k, g, ldg, a, lda, c, ldc, bias);
}

#else  // not x86-64 GCC/clang: never available

int64_t weight_panels_size(int64_t, int64_t) { return 0; }
void pack_weight_panels(const float*, int64_t, const int64_t*, int64_t, int64_t, float*) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: panel_gemm is not available in this build");
}
void panel_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: panel_gemm is not available in this build");
}
void gradient_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                   float*) {
  TORCH_INTERNAL_ASSERT(false, "seqfast: gradient_gemm is not available in this build");
}

bool small_gemm_available() { return false; }

#endif

bool small_gemm_enabled() {
  const char* off = std::getenv("SEQFAST_DISABLE_SMALL_GEMM");
  return small_gemm_available() && !(off != nullptr && std::strcmp(off, "0") != 0);
}

}  // namespace cpu
}  // namespace seqfast
