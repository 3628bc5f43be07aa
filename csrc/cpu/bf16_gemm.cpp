#include "bf16_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace seqfast {
namespace cpu {
namespace {

// Row and column blocks of one micro-kernel call; each call keeps its whole k. 32 columns: as fast as 64
// at the per-step shapes (64x512x2048, 37x512x2048, 64x256x1024) and twice as fast at 4x1024x4096
// (more blocks to share between the threads). 64 rows (a whole B=64 step per call): the canonical
// bf16 LSTM inference op took 110-112 ms at 1 thread against 147-154 ms with 32-row blocks.
constexpr int64_t kBlockN = 32;
constexpr int64_t kBlockM = 64;
constexpr int64_t kPadN = 16;
constexpr int64_t kMinRows = 256;  // see bf16_gemm_supports

}  // namespace

bool bf16_gemm_available() {
  static const bool available = [] {
    const char* off = std::getenv("SEQFAST_DISABLE_BRGEMM");
    if (off != nullptr && std::strcmp(off, "0") != 0) return false;
    return at::native::cpublas::could_pack(at::kBFloat16);
  }();
  return available;
}

bool bf16_gemm_supports(const at::Tensor& weight, int64_t total_rows) {
  return weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.size(1) % 2 == 0 &&
         weight.numel() > 0 && total_rows >= kMinRows && bf16_gemm_available();
}

Bf16Gemm::Bf16Gemm(const at::Tensor& weight) : n_(weight.size(0)), k_(weight.size(1)) {
  TORCH_INTERNAL_ASSERT(bf16_gemm_supports(weight, kMinRows));
  // oneDNN packs column blocks of 16 or 32 only (measured: 8 fails, any even k works), so W^T is
  // zero-padded to a multiple of 16 columns; run() keeps the padding out of the result.
  const int64_t n_pad = (n_ + kPadN - 1) / kPadN * kPadN;
  at::Tensor wt = at::zeros({k_, n_pad}, weight.options());
  wt.narrow(1, 0, n_).copy_(weight.t());
  const int64_t blocks = (n_pad + kBlockN - 1) / kBlockN;
  packed_ = at::empty({blocks, k_ * kBlockN}, weight.options());
  const at::BFloat16* src = wt.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t width = std::min(kBlockN, n_pad - b * kBlockN);
    at::native::cpublas::pack(k_, width, n_pad, width, at::kBFloat16, at::kBFloat16, src + b * kBlockN,
                              packed_[b].data_ptr<at::BFloat16>());
  }
  n_pad_ = n_pad;
}

void Bf16Gemm::run(int64_t rows, const at::BFloat16* a, int64_t lda, float* c, int64_t ldc,
                   bool accumulate, const float* bias) const {
  if (rows <= 0) return;
  const int64_t n_blocks = (n_pad_ + kBlockN - 1) / kBlockN, m_blocks = (rows + kBlockM - 1) / kBlockM;
  const at::BFloat16* packed = packed_.data_ptr<at::BFloat16>();
  const int64_t block_stride = packed_.size(1);
  // Task t = (column block t / m_blocks, row block t % m_blocks): consecutive tasks share a column
  // block, so each thread reads its own part of W^T, which then stays in its cache from step to step.
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    float edge[kBlockM * kBlockN];  // the last column block when it holds padding columns
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bn = t / m_blocks, bm = t % m_blocks;
      const int64_t n0 = bn * kBlockN, m0 = bm * kBlockM;
      const int64_t width = std::min(kBlockN, n_pad_ - n0), height = std::min(kBlockM, rows - m0);
      const int64_t valid = std::min(width, n_ - n0);
      float* tile = c + m0 * ldc + n0;
      const bool padded = valid < width;
      if (padded && accumulate) {
        for (int64_t r = 0; r < height; ++r) std::memcpy(edge + r * width, tile + r * ldc, sizeof(float) * valid);
      }
      at::native::cpublas::brgemm(height, width, k_, lda, width, padded ? width : ldc, accumulate,
                                  a + m0 * lda, packed + bn * block_stride, padded ? edge : tile,
                                  /*is_vnni=*/true);
      if (padded) {
        for (int64_t r = 0; r < height; ++r) std::memcpy(tile + r * ldc, edge + r * width, sizeof(float) * valid);
      }
      if (bias != nullptr) {  // epilogue while the tile is in cache
        for (int64_t r = 0; r < height; ++r) {
          float* __restrict row = tile + r * ldc;
          const float* __restrict b = bias + n0;
          for (int64_t j = 0; j < valid; ++j) row[j] += b[j];
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

}  // namespace cpu
}  // namespace seqfast
