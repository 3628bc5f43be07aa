#pragma once
// The persistent small-batch forward of one recurrent layer/direction (recurrent_layer_persistent.cu):
// one cooperative kernel runs every time step, each thread block holding its slice of W_hh in shared
// memory for the whole sequence, instead of one cuBLAS GEMM + one pointwise kernel per step
// (recurrent_layer_kernel.cu, the general path). This is the design of Persistent RNNs (Diamos et al.,
// 2016): at small batch a per-step GEMM re-reads all of W_hh from memory to do very little arithmetic
// with it, and two launches per step cost more than the step's work.
//
// NOT YET RUN ON A GPU: compile-checked only.

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "seqfast/recurrent_args.h"

namespace seqfast {
namespace cuda {

struct PersistentPlan {
  int blocks = 0;           // thread blocks, all co-resident (cooperative launch), one per unit slice
  int units_per_block = 0;  // hidden units per block; the last block may have fewer
  int k_splits = 1;         // warps that share a group of W_hh rows, each summing part of the H columns
  int64_t smem_bytes = 0;   // dynamic shared memory per block
};

// Whether the persistent kernel runs this layer, and how: std::nullopt (use the GEMM path) unless
// all of these hold:
//   - the environment variable SEQFAST_PERSISTENT_RNN is "1" (read on every call; "0" or unset: never,
//     any other value is an error). Opt-in until the kernel has run on a GPU: it is compile-checked
//     only, and a bug in a grid-synchronized kernel can hang rather than fail;
//   - no projection (w_hr), any cell kind, batch B (the largest step's) in [1, 8], hidden H <= 1024;
//   - the device supports cooperative launch, and the current stream is not being captured into a
//     CUDA graph;
//   - with U = ceil(H / SMs) hidden units per block (so that blocks = ceil(H / U) <= SMs), one thread
//     per (row, unit) of the cell update fits in a block (U * B <= 256), the block's shared memory
//     (its G*U rows of W_hh, the step's h rows, the partial gate sums) fits the device's opt-in limit,
//     and the occupancy calculator confirms that all the blocks are co-resident.
// At H = 1024 on an H200 (132 SMs, 227 KB): float32 LSTM uses 132-161 KB per block (B = 1..8) and
// fits; float64 LSTM would need 256 KB of W_hh per block and takes the GEMM path, as does float32
// LSTM on an A100 (108 SMs, 163 KB: 10 units, 160 KB of W_hh alone).
// The caller has made the input's device current.
std::optional<PersistentPlan> plan_persistent_forward(const at::Tensor& input, const LayerDims& d,
                                                      bool training);

// The same contract and results as the GEMM path of recurrent_layer_forward_cuda (output, hy, cy,
// workspace in the layout of include/seqfast/recurrent.h), for a layer `plan` accepted.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> persistent_layer_forward(
    const PersistentPlan& plan, const at::Tensor& input, const Schedule& s, const LayerDims& d,
    const at::Tensor& hx, const OptTensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, bool reverse, bool training);

}  // namespace cuda
}  // namespace seqfast
