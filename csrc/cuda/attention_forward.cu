// CUDA kernels of the attention forward ops (schemas in csrc/ops.cpp, math in
// include/seqfast/attention.h, parallel structure and dtype policy in attention_cuda.cuh):
//   attention_forward (dot, scaled_dot, general), additive_attention_forward (concat),
//   location_attention_forward.
// One warp per query row; keys stream by in blocks of 32 with an online softmax, so nothing is stored
// per (query, key) but the optional weights, and the additive score's tanh(qp + mp) is computed on the
// fly (never a (Nq, Tk, A) tensor).
//
// NOT YET RUN ON A GPU: compile-checked only.
#include <ATen/Dispatch.h>
#include <torch/library.h>


#include "attention_cuda.cuh"

namespace seqfast {
namespace cuda {
namespace attention_kernels {
namespace {

using at::Tensor;

template <typename T, typename A, ScoreKind Kind, bool NeedWeights>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionParams<T, A> p) {
  __shared__ A terms_shared[kWarpsPerBlock][kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (i >= p.num_queries) return;  // the whole warp leaves: only __syncwarp below
  const int64_t b = sequence_of_row(p.cu_seqlens_q, p.batch, i);
  int64_t start, L;
  p.keys(b, start, L);
  const int64_t Dm = p.Dm, W = p.max_seqlen_k;
  const T* q = p.query + i * p.query_width;
  A* acc = p.context + i * Dm;
  A* w = NeedWeights ? p.weights + i * W : nullptr;
  A* terms = terms_shared[warp];
  for (int64_t d = lane; d < Dm; d += kWarp) acc[d] = A(0);

  OnlineSoftmax<A> softmax;
  for (int64_t j0 = 0; j0 < L; j0 += kWarp) {
    const int n = static_cast<int>(L - j0 < kWarp ? L - j0 : kWarp);
    A my_score = A(0), block_max = -A(__builtin_inf());
    for (int jj = 0; jj < n; ++jj) {
      const A s = pair_score<Kind>(p, q, start + j0 + jj, j0 + jj, lane);
      if (lane == jj) my_score = s;
      block_max = s > block_max ? s : block_max;
    }
    const A factor = softmax.rescale(block_max);
    const A my_term = lane < n ? softmax.shifted_exp(my_score) : A(0);
    softmax.add_block_sum(warp_sum(my_term));
    if (NeedWeights && lane < n) w[j0 + lane] = my_score;  // normalized at the end, by this lane
    terms[lane] = my_term;
    __syncwarp();
    const T* rows = p.memory + (start + j0) * Dm;
    for (int64_t d = lane; d < Dm; d += kWarp) {
      A a = acc[d] * factor;
      for (int jj = 0; jj < n; ++jj) a += terms[jj] * to_acc<A>(rows[jj * Dm + d]);
      acc[d] = a;
    }
    __syncwarp();  // terms is rewritten by the next block
  }
  const A inv = L > 0 ? A(1) / softmax.sum : A(0);
  for (int64_t d = lane; d < Dm; d += kWarp) acc[d] *= inv;
  if (lane == 0) p.lse[i] = softmax.lse();
  if (NeedWeights) {
    for (int64_t j = lane; j < W; j += kWarp) w[j] = j < L ? softmax.weight(w[j]) : A(0);
  }
}

// Allocates the outputs (in A), launches, and returns them in the memory's dtype (lse stays in A).
template <typename T, ScoreKind Kind>
std::tuple<Tensor, Tensor, Tensor> run_forward(AttentionParams<T, at::opmath_type<T>>& p, const Layout& l,
                                               const Tensor& memory, bool need_weights) {
  using A = at::opmath_type<T>;
  auto [context, lse, weights] = attention::forward_results(p, l, memory, need_weights);
  if (l.Nq > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (need_weights) {
      forward_kernel<T, A, Kind, true><<<blocks_for_rows(l.Nq), kThreads, 0, stream>>>(p);
    } else {
      forward_kernel<T, A, Kind, false><<<blocks_for_rows(l.Nq), kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {context.to(memory.scalar_type()), lse, weights.to(memory.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> attention_forward_cuda(
    const Tensor& query, const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, int64_t max_seqlen_k, double scale, bool need_weights) {
  const char* op = "attention_forward";
  check_cuda_float(memory, op);
  const Layout l = attention::check_dot(op, query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        max_seqlen_k);
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor q = query.contiguous(), m = memory.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "attention_forward_cuda", [&] {
    AttentionParams<scalar_t, at::opmath_type<scalar_t>> p;
    const Tensor index = upload_index(l, m.device(), p);
    attention::set_inputs(p, q, m);
    p.scale = static_cast<at::opmath_type<scalar_t>>(scale);
    return run_forward<scalar_t, ScoreKind::Dot>(p, l, m, need_weights);
  });
}

std::tuple<Tensor, Tensor, Tensor> additive_attention_forward_cuda(
    const Tensor& query_proj, const Tensor& memory_proj, const Tensor& memory, const Tensor& v,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
    int64_t max_seqlen_k, bool need_weights) {
  const char* op = "additive_attention_forward";
  check_cuda_float(memory, op);
  const Layout l = attention::check_additive(op, query_proj, memory_proj, memory, v, cu_seqlens_q,
                                             cu_seqlens_k, seqused_k, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor q = query_proj.contiguous(), mp = memory_proj.contiguous(), m = memory.contiguous();
  const Tensor vv = v.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "additive_attention_forward_cuda", [&] {
    AttentionParams<scalar_t, at::opmath_type<scalar_t>> p;
    const Tensor index = upload_index(l, m.device(), p);
    attention::set_inputs(p, q, m, mp, vv);
    return run_forward<scalar_t, ScoreKind::Additive>(p, l, m, need_weights);
  });
}

std::tuple<Tensor, Tensor, Tensor> location_attention_forward_cuda(
    const Tensor& scores, const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, int64_t max_seqlen_k, bool need_weights) {
  const char* op = "location_attention_forward";
  check_cuda_float(memory, op);
  const Layout l = attention::check_location(op, scores, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                             max_seqlen_k);
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor s = scores.contiguous(), m = memory.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "location_attention_forward_cuda", [&] {
    AttentionParams<scalar_t, at::opmath_type<scalar_t>> p;
    const Tensor index = upload_index(l, m.device(), p);
    attention::set_inputs(p, s, m);
    return run_forward<scalar_t, ScoreKind::Location>(p, l, m, need_weights);
  });
}

}  // namespace
}  // namespace attention_kernels
}  // namespace cuda
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CUDA, m) {
  m.impl("attention_forward", &seqfast::cuda::attention_kernels::attention_forward_cuda);
  m.impl("additive_attention_forward", &seqfast::cuda::attention_kernels::additive_attention_forward_cuda);
  m.impl("location_attention_forward", &seqfast::cuda::attention_kernels::location_attention_forward_cuda);
}
