// CUDA kernels of the attention backward ops (schemas in csrc/ops.cpp, math in
// include/seqfast/attention.h, parallel structure and dtype policy in attention_cuda.cuh):
//   attention_backward, additive_attention_backward, location_attention_backward.
// FlashAttention-style: nothing per (query, key) was saved; the probabilities are recomputed from the
// forward's log-sum-exp, p_ij = exp(s_ij - lse_i). Two kernels, each writing only the rows it owns:
//   query side (a warp per query row):  D_i = sum_j p_ij dp_ij (first sweep over the keys), then
//                                       ds_ij = p_ij (dp_ij - D_i) and the query-side gradient
//                                       (second sweep); D_i goes to a (Nq) scratch;
//   key side (a warp per memory row):   recomputes p_ij, dp_ij and, with D_i, ds_ij over the
//                                       sequence's queries; writes the memory row's gradients (and
//                                       for concat its memory_proj row and a per-row partial of dv).
// Memory rows past a sequence's used length (padding) get zero gradients.
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

template <typename T, typename A, ScoreKind Kind>
__global__ void __launch_bounds__(kThreads) backward_query_kernel(const AttentionParams<T, A> p) {
  __shared__ A ds_shared[kWarpsPerBlock][kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (i >= p.num_queries) return;
  const int64_t b = sequence_of_row(p.cu_seqlens_q, p.batch, i);
  int64_t start, L;
  p.keys(b, start, L);
  const int64_t Dm = p.Dm, W = p.max_seqlen_k, width = p.query_width;
  const T* q = p.query + i * width;
  const T* go = p.grad_context + i * Dm;
  const T* gw = p.grad_weights != nullptr ? p.grad_weights + i * W : nullptr;
  A* gq = p.grad_query + i * width;
  for (int64_t k = lane; k < width; k += kWarp) gq[k] = A(0);
  if (L == 0) {  // zero context whatever the query: every gradient stays 0
    if (lane == 0) p.softmax_dot[i] = A(0);
    return;
  }
  const A lse = p.saved_lse[i];

  A D = A(0);
  for (int64_t j = 0; j < L; ++j) {
    A s, dp;
    pair_score_and_dp<Kind>(p, q, go, gw, start + j, j, lane, s, dp);
    D += math::exp(s - lse) * dp;
  }
  if (lane == 0) p.softmax_dot[i] = D;

  A* ds_block = ds_shared[warp];
  for (int64_t j0 = 0; j0 < L; j0 += kWarp) {
    const int n = static_cast<int>(L - j0 < kWarp ? L - j0 : kWarp);
    A my_ds = A(0);
    for (int jj = 0; jj < n; ++jj) {
      A s, dp;
      pair_score_and_dp<Kind>(p, q, go, gw, start + j0 + jj, j0 + jj, lane, s, dp);
      const A ds = softmax_backward(math::exp(s - lse), dp, D);
      if (lane == jj) my_ds = ds;
    }
    if constexpr (Kind == ScoreKind::Location) {
      if (lane < n) gq[j0 + lane] = my_ds;  // the scores' gradient is ds itself; zero past L
      continue;
    }
    ds_block[lane] = my_ds;
    __syncwarp();
    if constexpr (Kind == ScoreKind::Dot) {
      // dq = scale * sum_j ds_j m_j
      const T* rows = p.memory + (start + j0) * Dm;
      for (int64_t d = lane; d < Dm; d += kWarp) {
        A a = A(0);
        for (int jj = 0; jj < n; ++jj) a += ds_block[jj] * to_acc<A>(rows[jj * Dm + d]);
        gq[d] += p.scale * a;
      }
    } else if constexpr (Kind == ScoreKind::Additive) {
      // dqp_a = sum_j ds_j v_a (1 - t_ja^2), t_ja = tanh(qp_a + mp_ja)
      const T* rows = p.memory_proj + (start + j0) * width;
      for (int64_t a = lane; a < width; a += kWarp) {
        const A qa = to_acc<A>(q[a]), va = to_acc<A>(p.v[a]);
        A g = A(0);
        for (int jj = 0; jj < n; ++jj) {
          g += additive_pre_grad(ds_block[jj], va, additive_tanh(qa, to_acc<A>(rows[jj * width + a])));
        }
        gq[a] += g;
      }
    }
    __syncwarp();  // ds_block is rewritten by the next block
  }
}

template <typename T, typename A, ScoreKind Kind>
__global__ void __launch_bounds__(kThreads) backward_key_kernel(const AttentionParams<T, A> p) {
  __shared__ A prob_shared[kWarpsPerBlock][kWarp];
  __shared__ A ds_shared[kWarpsPerBlock][kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (r >= p.num_keys) return;
  const int64_t b = sequence_of_row(p.cu_seqlens_k, p.batch, r);
  int64_t start, L;
  p.keys(b, start, L);
  const int64_t j = r - start, Dm = p.Dm, W = p.max_seqlen_k, width = p.query_width;
  A* gm = p.grad_memory + r * Dm;
  A* gmp = Kind == ScoreKind::Additive ? p.grad_memory_proj + r * width : nullptr;
  A* gv = Kind == ScoreKind::Additive ? p.grad_v + r * width : nullptr;
  for (int64_t d = lane; d < Dm; d += kWarp) gm[d] = A(0);
  if constexpr (Kind == ScoreKind::Additive) {
    for (int64_t a = lane; a < width; a += kWarp) gmp[a] = gv[a] = A(0);
  }
  if (j >= L) return;  // padding: never read by the forward

  A* prob_block = prob_shared[warp];
  A* ds_block = ds_shared[warp];
  const int64_t q_end = p.cu_seqlens_q[b + 1];
  for (int64_t i0 = p.cu_seqlens_q[b]; i0 < q_end; i0 += kWarp) {
    const int n = static_cast<int>(q_end - i0 < kWarp ? q_end - i0 : kWarp);
    A my_prob = A(0), my_ds = A(0);
    for (int ii = 0; ii < n; ++ii) {
      const int64_t i = i0 + ii;
      const T* gw = p.grad_weights != nullptr ? p.grad_weights + i * W : nullptr;
      A s, dp;
      pair_score_and_dp<Kind>(p, p.query + i * width, p.grad_context + i * Dm, gw, r, j, lane, s, dp);
      const A prob = math::exp(s - p.saved_lse[i]);
      const A ds = softmax_backward(prob, dp, p.softmax_dot[i]);
      if (lane == ii) {
        my_prob = prob;
        my_ds = ds;
      }
    }
    prob_block[lane] = my_prob;
    ds_block[lane] = my_ds;
    __syncwarp();
    // dm_j = sum_i p_ij dcontext_i (+ scale ds_ij q_i: for the dot score the memory is also the key)
    const T* go_rows = p.grad_context + i0 * Dm;
    const T* q_rows = p.query + i0 * width;
    for (int64_t d = lane; d < Dm; d += kWarp) {
      A a = A(0);
      for (int ii = 0; ii < n; ++ii) {
        a += prob_block[ii] * to_acc<A>(go_rows[ii * Dm + d]);
        if constexpr (Kind == ScoreKind::Dot) a += p.scale * ds_block[ii] * to_acc<A>(q_rows[ii * Dm + d]);
      }
      gm[d] += a;
    }
    if constexpr (Kind == ScoreKind::Additive) {
      // dmp_ja = sum_i ds_ij v_a (1 - t_ija^2); this row's part of dv_a = sum_i ds_ij t_ija
      const T* mp = p.memory_proj + r * width;
      for (int64_t a = lane; a < width; a += kWarp) {
        const A ma = to_acc<A>(mp[a]), va = to_acc<A>(p.v[a]);
        A g = A(0), dv = A(0);
        for (int ii = 0; ii < n; ++ii) {
          g += additive_backward(ds_block[ii], va, additive_tanh(to_acc<A>(q_rows[ii * width + a]), ma), dv);
        }
        gmp[a] += g;
        gv[a] += dv;
      }
    }
    __syncwarp();
  }
}

// Launches both kernels: the key side reads the D_i the query side wrote (same stream, in order).
template <typename T, ScoreKind Kind>
void launch_backward(const AttentionParams<T, at::opmath_type<T>>& p) {
  using A = at::opmath_type<T>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (p.num_queries > 0) {
    backward_query_kernel<T, A, Kind><<<blocks_for_rows(p.num_queries), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.num_keys > 0) {
    backward_key_kernel<T, A, Kind><<<blocks_for_rows(p.num_keys), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Points p at the backward's inputs (memory_proj and v undefined except for concat) and allocates the
// (Nq) D scratch, which the caller keeps alive until the launches are queued.
template <typename T>
Tensor backward_inputs(AttentionParams<T, at::opmath_type<T>>& p, const Tensor& query, const Tensor& memory,
                       const Tensor& memory_proj, const Tensor& v, const Tensor& grad_context,
                       const Tensor& grad_weights, const Tensor& lse) {
  using A = at::opmath_type<T>;
  attention::set_inputs(p, query, memory, memory_proj, v);
  attention::set_backward_inputs(p, grad_context, grad_weights, lse);
  Tensor softmax_dot = acc_empty<A>({query.size(0)}, memory);
  p.softmax_dot = softmax_dot.data_ptr<A>();
  return softmax_dot;
}

// attention_backward and location_attention_backward: the gradients of the query-side rows and of the
// memory.
template <ScoreKind Kind>
std::tuple<Tensor, Tensor> query_row_backward(const char* op, const Layout& l, const Tensor& grad_context,
                                              const OptTensor& grad_weights, const Tensor& query,
                                              const Tensor& memory, const Tensor& lse, double scale) {
  attention::check_backward(op, l, grad_context, grad_weights, memory, lse,
                            at::toOpMathType(memory.scalar_type()));
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor q = query.contiguous(), m = memory.contiguous(), go = grad_context.contiguous();
  const Tensor ls = lse.contiguous();
  const Tensor gw = grad_weights.has_value() ? grad_weights->contiguous() : Tensor();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "query_row_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p;
    const Tensor index = upload_index(l, m.device(), p);
    const Tensor scratch = backward_inputs(p, q, m, Tensor(), Tensor(), go, gw, ls);
    p.scale = static_cast<A>(scale);
    Tensor grad_query = acc_empty<A>(q.sizes(), m), grad_memory = acc_empty<A>(m.sizes(), m);
    p.grad_query = grad_query.data_ptr<A>();
    p.grad_memory = grad_memory.data_ptr<A>();
    launch_backward<scalar_t, Kind>(p);
    return std::make_tuple(grad_query.to(m.scalar_type()), grad_memory.to(m.scalar_type()));
  });
}

std::tuple<Tensor, Tensor> attention_backward_cuda(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query,
    const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k, double scale) {
  const char* op = "attention_backward";
  check_cuda_float(memory, op);
  const Layout l = attention::check_dot(op, query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        max_seqlen_k);
  return query_row_backward<ScoreKind::Dot>(op, l, grad_context, grad_weights, query, memory, lse, scale);
}

std::tuple<Tensor, Tensor> location_attention_backward_cuda(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& scores,
    const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k) {
  const char* op = "location_attention_backward";
  check_cuda_float(memory, op);
  const Layout l = attention::check_location(op, scores, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                             max_seqlen_k);
  return query_row_backward<ScoreKind::Location>(op, l, grad_context, grad_weights, scores, memory, lse,
                                                 /*scale=*/1.0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_backward_cuda(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query_proj,
    const Tensor& memory_proj, const Tensor& memory, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k) {
  const char* op = "additive_attention_backward";
  check_cuda_float(memory, op);
  const Layout l = attention::check_additive(op, query_proj, memory_proj, memory, v, cu_seqlens_q,
                                             cu_seqlens_k, seqused_k, max_seqlen_k);
  attention::check_backward(op, l, grad_context, grad_weights, memory, lse,
                            at::toOpMathType(memory.scalar_type()));
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor q = query_proj.contiguous(), mp = memory_proj.contiguous(), m = memory.contiguous();
  const Tensor vv = v.contiguous(), go = grad_context.contiguous(), ls = lse.contiguous();
  const Tensor gw = grad_weights.has_value() ? grad_weights->contiguous() : Tensor();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "additive_attention_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p;
    const Tensor index = upload_index(l, m.device(), p);
    const Tensor scratch = backward_inputs(p, q, m, mp, vv, go, gw, ls);
    Tensor grad_query_proj = acc_empty<A>(q.sizes(), m), grad_memory_proj = acc_empty<A>(mp.sizes(), m);
    Tensor grad_memory = acc_empty<A>(m.sizes(), m);
    Tensor grad_v_rows = acc_empty<A>({l.Nk, q.size(1)}, m);  // per memory row; summed below
    p.grad_query = grad_query_proj.data_ptr<A>();
    p.grad_memory = grad_memory.data_ptr<A>();
    p.grad_memory_proj = grad_memory_proj.data_ptr<A>();
    p.grad_v = grad_v_rows.data_ptr<A>();
    launch_backward<scalar_t, ScoreKind::Additive>(p);
    const auto st = m.scalar_type();
    return std::make_tuple(grad_query_proj.to(st), grad_memory_proj.to(st), grad_memory.to(st),
                           grad_v_rows.sum(0).to(st));
  });
}

}  // namespace
}  // namespace attention_kernels
}  // namespace cuda
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CUDA, m) {
  m.impl("attention_backward", &seqfast::cuda::attention_kernels::attention_backward_cuda);
  m.impl("additive_attention_backward", &seqfast::cuda::attention_kernels::additive_attention_backward_cuda);
  m.impl("location_attention_backward", &seqfast::cuda::attention_kernels::location_attention_backward_cuda);
}
