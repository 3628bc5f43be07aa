#include "buffers.h"

#include <c10/util/accumulate.h>

#include <cstdlib>
#include <mutex>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace seqfast {
namespace cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinHugeBytes = size_t(1) << 20;
// Below 1 MiB buffers are pooled too, rounded to 64 KiB: glibc serves them from the heap top or a
// fresh mapping and gives the pages back when they are freed (trim / munmap), so a small layer
// faulted its workspace, gate gradients and input projection afresh every call (page faults were 11%
// of the calling thread's time in a seed-stock LSTM training step, T=7, B=505, H=10: perf).
constexpr size_t kMinPooledBytes = size_t(64) << 10;
constexpr size_t kSmallGranule = size_t(64) << 10;
constexpr size_t kPageBytes = size_t(4) << 10;

// Freed large buffers kept for the next call. Without it every call maps its workspace, output and
// gradient buffers afresh and the kernel zeroes each new huge page on first write: `clear_page_erms`
// was 6.5% of an nmt-enc LSTM training step (perf). Blocks are reused only for a request of at least
// half their size (so a small request does not pin a large block), and at most `limit` bytes are kept
// (SEQFAST_CPU_BUFFER_CACHE_MB, default 256; 0 frees every block at once, as before).
struct Block {
  void* data;
  size_t length;
};

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: deleters may run at exit
    return *pool;
  }

  // A kept block of at least `length` bytes (the smallest that fits), or {nullptr, 0}.
  Block take(size_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = blocks_.size();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const size_t have = blocks_[i].length;
      // Ties go to the later block, the one freed last (likeliest still in cache).
      if (have >= length && have / 2 <= length && (best == blocks_.size() || have <= blocks_[best].length))
        best = i;
    }
    if (best == blocks_.size()) return {nullptr, 0};
    const Block block = blocks_[best];
    held_ -= block.length;
    blocks_[best] = blocks_.back();
    blocks_.pop_back();
    return block;
  }

  // Keeps the block, or frees it when the pool is full (or disabled).
  void give(const Block& block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + block.length <= limit_) {
        blocks_.push_back(block);
        held_ += block.length;
        return;
      }
    }
    std::free(block.data);
  }

 private:

  BufferPool() {
    size_t mb = 256;
    if (const char* env = std::getenv("SEQFAST_CPU_BUFFER_CACHE_MB")) mb = size_t(std::max(0LL, std::atoll(env)));
    limit_ = mb << 20;
  }

  std::mutex mutex_;
  std::vector<Block> blocks_;
  size_t held_ = 0;
  size_t limit_ = 0;
};

}  // namespace
#endif

at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && bytes >= kMinPooledBytes) {
    const bool huge = bytes >= kMinHugeBytes;
    const size_t granule = huge ? kHugePage : kSmallGranule;
    const size_t length = (bytes + granule - 1) / granule * granule;
    Block block = BufferPool::instance().take(length);
    if (block.data == nullptr) {
      block = {std::aligned_alloc(huge ? kHugePage : kPageBytes, length), length};
      if (block.data != nullptr && huge) madvise(block.data, length, MADV_HUGEPAGE);  // a hint: without THP a no-op
    }
    if (block.data != nullptr)
      return at::from_blob(block.data, sizes, [block](void*) { BufferPool::instance().give(block); }, options);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace seqfast
