#pragma once
#include <ATen/ATen.h>

namespace seqfast {
namespace cpu {

// An uninitialized tensor for the large per-call buffers of the recurrent kernels (the input
// projection of every step, the saved workspace, the gate gradients: tens of MB each at the canonical
// size). They are written once per call, so with 4 KiB pages the kernel's page faults are a visible
// cost (~40 ms of a 180 ms training forward at T=100, B=64, H=512). Buffers of 1 MiB or more are
// therefore allocated 2 MiB-aligned and marked MADV_HUGEPAGE (what torch does for every allocation
// when THP_MEM_ALLOC_ENABLE=1). Buffers of 64 KiB or more, when freed, are kept (up to
// SEQFAST_CPU_BUFFER_CACHE_MB, default 256) for the next call's buffers, which then fault no page at
// all; smaller ones come from at::empty.
at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace seqfast
