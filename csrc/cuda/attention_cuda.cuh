#pragma once
// What the CUDA attention kernels (attention_forward.cu, attention_backward.cu) share: the launch
// shape, warp reductions, the per-(query, key) score terms, and the host-side upload of the varlen
// index and the dtype policy.
//
// Parallel structure: one warp per row. The forward and the query-side backward give each query row a
// warp; the key-side backward gives each memory row a warp, so every gradient row has exactly one
// writer (no atomics, deterministic results). A warp walks its partners (keys, or queries) in blocks of
// 32: one warp-reduced score per partner, lane jj keeps partner jj's coefficient (softmax term or dL/ds)
// in shared memory, then the lanes sweep the row's columns once per block, each column a sum over the
// block's partners read coalesced across lanes. The accumulated row lives in the (float32 or float64)
// output and is read and written once per block of 32 partners.
//
// dtypes: float32, float64, float16, bfloat16. The kernels compute in A = at::opmath_type<T> and write
// every result in A (float for the half types, so lse and the accumulated rows keep float precision);
// the host converts the context, weights and gradients to T afterwards. lse stays in A.
//
// NOT YET RUN ON A GPU: compile-checked only (see the README).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "seqfast/attention_args.h"

namespace seqfast {
namespace cuda {
namespace attention_kernels {

using attention::acc_empty;
using attention::Layout;
using attention::OptTensor;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks for one warp per row.
inline unsigned int blocks_for_rows(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Sum over the warp. Butterfly exchange: at every step lanes l and l^offset add the same two values
// (a + b == b + a exactly), so every lane ends with the same bits and the warp-uniform branches that
// follow (the online-softmax rescale) cannot diverge between lanes.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T x) {
  return static_cast<A>(x);
}

// Score of query row q (row i of the query-side input) against memory row r, key j of its sequence.
// Warp-uniform result; every lane must call it.
template <ScoreKind Kind, typename T, typename A>
__device__ __forceinline__ A pair_score(const AttentionParams<T, A>& p, const T* q, int64_t r, int64_t j,
                                        int lane) {
  A s = A(0);
  if constexpr (Kind == ScoreKind::Dot) {
    const T* m = p.memory + r * p.Dm;
    for (int64_t k = lane; k < p.Dm; k += kWarp) s += to_acc<A>(q[k]) * to_acc<A>(m[k]);
    return p.scale * warp_sum(s);
  } else if constexpr (Kind == ScoreKind::Additive) {
    const T* mp = p.memory_proj + r * p.query_width;
    for (int64_t a = lane; a < p.query_width; a += kWarp) {
      s += to_acc<A>(p.v[a]) * additive_tanh(to_acc<A>(q[a]), to_acc<A>(mp[a]));
    }
    return warp_sum(s);
  } else {
    return to_acc<A>(q[j]);
  }
}

// The score and dL/dp = dcontext . m_r (+ dweights) of one pair, for the backward. go: the query's
// grad_context row; gw: its grad_weights row or nullptr.
template <ScoreKind Kind, typename T, typename A>
__device__ __forceinline__ void pair_score_and_dp(const AttentionParams<T, A>& p, const T* q, const T* go,
                                                  const T* gw, int64_t r, int64_t j, int lane, A& s,
                                                  A& dp) {
  const T* m = p.memory + r * p.Dm;
  A d = A(0);
  if constexpr (Kind == ScoreKind::Dot) {
    A qm = A(0);
    for (int64_t k = lane; k < p.Dm; k += kWarp) {
      const A mk = to_acc<A>(m[k]);
      qm += to_acc<A>(q[k]) * mk;
      d += to_acc<A>(go[k]) * mk;
    }
    s = p.scale * warp_sum(qm);
  } else {
    for (int64_t k = lane; k < p.Dm; k += kWarp) d += to_acc<A>(go[k]) * to_acc<A>(m[k]);
    s = pair_score<Kind>(p, q, r, j, lane);
  }
  dp = warp_sum(d) + (gw != nullptr ? to_acc<A>(gw[j]) : A(0));
}

// ------------------------------------------------------------------------------------------------
// Host side.

inline void check_cuda_float(const at::Tensor& memory, const char* op) {
  TORCH_CHECK(memory.is_cuda(), "seqfast::", op, ": the memory must be a CUDA tensor, got one on ",
              memory.device());
  const auto st = memory.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "seqfast::", op, ": the CUDA kernels support float32, float64, float16 and bfloat16, got ",
              st);
}

// The validated index (CPU int32) on the device: one pinned buffer [cu_q | cu_k | used_k], one
// asynchronous copy on the current stream (the caching host allocator keeps the pinned block alive
// until the copy is done). Fills the index pointers of p.
template <typename T, typename A>
at::Tensor upload_index(const Layout& l, const at::Device& device, AttentionParams<T, A>& p) {
  // Under CUDA graph capture the copy below would be recorded with the address of a pinned block that
  // the caching host allocator hands out again after this call, so a replay would read whatever is
  // there by then. Refuse rather than risk wrong results.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "seqfast: the attention ops read their varlen index (int32 CPU tensors) on every call and "
              "cannot be captured into a CUDA graph; run them outside the graph (for torch.compile, "
              "without mode=\"reduce-overhead\")");
  const int64_t B = l.B, n = 2 * (B + 1) + (l.used_k.defined() ? B : 0);
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* h = host.data_ptr<int32_t>();
  std::copy(l.cu_q_ptr(), l.cu_q_ptr() + B + 1, h);
  std::copy(l.cu_k_ptr(), l.cu_k_ptr() + B + 1, h + B + 1);
  if (l.used_k.defined()) std::copy(l.used_k_ptr(), l.used_k_ptr() + B, h + 2 * (B + 1));
  at::Tensor dev = host.to(device, at::kInt, /*non_blocking=*/true);
  const int32_t* d = dev.data_ptr<int32_t>();
  p.batch = B;
  p.num_queries = l.Nq;
  p.num_keys = l.Nk;
  p.max_seqlen_k = l.max_seqlen_k;
  p.cu_seqlens_q = d;
  p.cu_seqlens_k = d + B + 1;
  p.seqused_k = l.used_k.defined() ? d + 2 * (B + 1) : nullptr;
  p.seq_of_query = nullptr;  // the kernels search cu_seqlens_q instead (sequence_of_row)
  return dev;
}

}  // namespace attention_kernels
}  // namespace cuda
}  // namespace seqfast
