#include "buffers.h"

#include <c10/util/accumulate.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace seqfast {
namespace cpu {

at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && bytes >= 4 * kHugePage) {
    const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, length);
    if (data != nullptr) {
      madvise(data, length, MADV_HUGEPAGE);  // a hint: without THP it is a no-op
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace seqfast
