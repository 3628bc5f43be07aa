// CPU kernels of the seqfast attention ops (schemas and shapes in csrc/ops.cpp, layout and math in
// csrc/include/seqfast/attention.h):
//   attention_forward / attention_backward                      dot, scaled_dot, general
//   additive_attention_forward / additive_attention_backward    concat (Bahdanau)
//   location_attention_forward / location_attention_backward    location (scores given)
//
// Forward: parallel over query rows (every (sequence, query) pair is independent). Per query, keys
// stream by in blocks of kKeyBlock: the block's scores, one rescale of the running context, then the
// weighted sum of the block's memory rows while they are in L1. Nothing is stored per (query, key) but
// the optional weights; the additive score's tanh(qp + mp) is computed on the fly, vectorized over A.
// Backward: parallel over sequences, so the memory-side gradients of a sequence are written by one
// thread only (no atomics, no per-thread copies of dmemory). Per query the probabilities are recomputed
// from the saved log-sum-exp; the additive backward keeps that query's (L, A) tanh rows in a
// thread-local buffer so tanh is evaluated once per pair, as in the forward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "dot_rows.h"
#include "multiversion.h"
#include "seqfast/attention_args.h"


namespace seqfast {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kKeyBlock = 32;

// ------------------------------------------------------------------------------------------------
// Vector helpers. `omp simd reduction` lets the compiler reassociate the sum (we build without
// -ffast-math), which is what makes the reductions vectorize. dot and dot_rows are in dot_rows.h.

// y += alpha * x
template <typename T>
SEQFAST_CPU_INLINE void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

template <typename T>
SEQFAST_CPU_INLINE void scale_in_place(T alpha, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] *= alpha;
}

// The loops over several memory rows work on 4 rows at a time: 4 independent accumulator chains hide
// the FMA latency that a single dot product is bound by, and x is loaded once for 4 rows.

// outx[j] = x . rows[j] and outy[j] = y . rows[j] in one pass over the rows.
template <typename T>
SEQFAST_CPU_INLINE void dot2_rows(const T* __restrict x, const T* __restrict y, const T* __restrict rows,
                                  int64_t n, int64_t D, T* __restrict outx, T* __restrict outy) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* __restrict r0 = rows + j * D;
    const T* __restrict r1 = r0 + D;
    const T* __restrict r2 = r1 + D;
    const T* __restrict r3 = r2 + D;
    T a0 = T(0), a1 = T(0), a2 = T(0), a3 = T(0), b0 = T(0), b1 = T(0), b2 = T(0), b3 = T(0);
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
    for (int64_t k = 0; k < D; ++k) {
      const T xk = x[k], yk = y[k];
      const T v0 = r0[k], v1 = r1[k], v2 = r2[k], v3 = r3[k];
      a0 += xk * v0;
      a1 += xk * v1;
      a2 += xk * v2;
      a3 += xk * v3;
      b0 += yk * v0;
      b1 += yk * v1;
      b2 += yk * v2;
      b3 += yk * v3;
    }
    outx[j] = a0;
    outx[j + 1] = a1;
    outx[j + 2] = a2;
    outx[j + 3] = a3;
    outy[j] = b0;
    outy[j + 1] = b1;
    outy[j + 2] = b2;
    outy[j + 3] = b3;
  }
  for (; j < n; ++j) {
    outx[j] = dot(x, rows + j * D, D);
    outy[j] = dot(y, rows + j * D, D);
  }
}

// acc += sum_j w[j] rows[j], rows j < n of a row-major (n, D) block.
template <typename T>
SEQFAST_CPU_INLINE void add_weighted_rows(T* __restrict acc, const T* __restrict w,
                                          const T* __restrict rows, int64_t n, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* __restrict r0 = rows + j * D;
    const T* __restrict r1 = r0 + D;
    const T* __restrict r2 = r1 + D;
    const T* __restrict r3 = r2 + D;
    const T w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) acc[k] += (w0 * r0[k] + w1 * r1[k]) + (w2 * r2[k] + w3 * r3[k]);
  }
  for (; j < n; ++j) axpy(w[j], rows + j * D, acc, D);
}

// ------------------------------------------------------------------------------------------------
// Score of query row q against memory row `row` (= key `j` of its sequence).
template <typename T, ScoreKind Kind>
SEQFAST_CPU_INLINE T score_of(const AttentionParams<T>& p, const T* __restrict q, int64_t row,
                              int64_t j) {
  if constexpr (Kind == ScoreKind::Dot) {
    return p.scale * dot(q, p.memory + row * p.Dm, p.Dm);
  } else if constexpr (Kind == ScoreKind::Additive) {
    const int64_t A = p.query_width;
    const T* __restrict mp = p.memory_proj + row * A;
    const T* __restrict v = p.v;
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t a = 0; a < A; ++a) s += v[a] * additive_tanh(q[a], mp[a]);
    return s;
  } else {
    return q[j];
  }
}

// ------------------------------------------------------------------------------------------------
// Forward of query rows [i0, i1).
template <typename T, ScoreKind Kind, bool NeedWeights>
SEQFAST_CPU_MULTIVERSION void forward_queries(const AttentionParams<T>& p, int64_t i0, int64_t i1) {
  const int64_t Dm = p.Dm, W = p.max_seqlen_k;
  std::vector<T> acc_buffer(Dm);
  T* __restrict acc = acc_buffer.data();
  T s_block[kKeyBlock], e_block[kKeyBlock];
  for (int64_t i = i0; i < i1; ++i) {
    int64_t start, L;
    p.keys(p.seq_of_query[i], start, L);
    const T* q = p.query + i * p.query_width;
    T* w = NeedWeights ? p.weights + i * W : nullptr;
    std::fill(acc, acc + Dm, T(0));
    OnlineSoftmax<T> softmax;
    for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
      const int64_t n = std::min(kKeyBlock, L - j0);
      const T* block_rows = p.memory + (start + j0) * Dm;
      if constexpr (Kind == ScoreKind::Dot) {
        dot_rows(q, block_rows, n, Dm, s_block);
        for (int64_t jj = 0; jj < n; ++jj) s_block[jj] *= p.scale;
      } else {
        for (int64_t jj = 0; jj < n; ++jj) s_block[jj] = score_of<T, Kind>(p, q, start + j0 + jj, j0 + jj);
      }
      T block_max = -std::numeric_limits<T>::infinity();
      for (int64_t jj = 0; jj < n; ++jj) block_max = s_block[jj] > block_max ? s_block[jj] : block_max;
      const T factor = softmax.rescale(block_max);
      if (factor != T(1)) scale_in_place(factor, acc, Dm);
      if (NeedWeights) std::copy(s_block, s_block + n, w + j0);
      for (int64_t jj = 0; jj < n; ++jj) e_block[jj] = softmax.add(s_block[jj]);
      add_weighted_rows(acc, e_block, block_rows, n, Dm);
    }
    T* __restrict out = p.context + i * Dm;
    const T inv = L > 0 ? T(1) / softmax.sum : T(0);
#pragma omp simd
    for (int64_t d = 0; d < Dm; ++d) out[d] = acc[d] * inv;
    p.lse[i] = softmax.lse();
    if (NeedWeights) {
      for (int64_t j = 0; j < L; ++j) w[j] = softmax.weight(w[j]);
      std::fill(w + L, w + W, T(0));
    }
  }
}

// Backward of the sequences [b0, b1).
template <typename T, ScoreKind Kind>
SEQFAST_CPU_MULTIVERSION void backward_sequences(const AttentionParams<T>& p, int64_t b0,
                                                 int64_t b1) {
  const int64_t Dm = p.Dm, W = p.max_seqlen_k, A = p.query_width;
  std::vector<T> prob(W), ds(W);
  std::vector<T> tanh_rows(Kind == ScoreKind::Additive ? W * A : 0);
  for (int64_t b = b0; b < b1; ++b) {
    int64_t start, L;
    p.keys(b, start, L);
    // The gradients are allocated uninitialized; every row belongs to exactly one sequence, so zeroing
    // the sequence's rows here (in parallel, right before they are accumulated into) covers them all,
    // padded memory rows included.
    const int64_t q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int64_t k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
    std::fill(p.grad_query + q0 * p.query_width, p.grad_query + q1 * p.query_width, T(0));
    std::fill(p.grad_memory + k0 * Dm, p.grad_memory + k1 * Dm, T(0));
    if constexpr (Kind == ScoreKind::Additive) {
      std::fill(p.grad_memory_proj + k0 * A, p.grad_memory_proj + k1 * A, T(0));
      std::fill(p.grad_v + b * A, p.grad_v + (b + 1) * A, T(0));
    }
    if (L == 0) continue;  // zero context whatever the query: all gradients stay 0
    for (int64_t i = p.cu_seqlens_q[b]; i < p.cu_seqlens_q[b + 1]; ++i) {
      const T* __restrict q = p.query + i * p.query_width;
      const T* __restrict go = p.grad_context + i * Dm;
      const T* gw = p.grad_weights != nullptr ? p.grad_weights + i * W : nullptr;
      const T lse = p.saved_lse[i];
      const T* key_rows = p.memory + start * Dm;
      // prob <- scores, ds <- dcontext . m_j
      if constexpr (Kind == ScoreKind::Dot) {
        dot2_rows(q, go, key_rows, L, Dm, prob.data(), ds.data());
        for (int64_t j = 0; j < L; ++j) prob[j] *= p.scale;
      } else {
        dot_rows(go, key_rows, L, Dm, ds.data());
        for (int64_t j = 0; j < L; ++j) {
          if constexpr (Kind == ScoreKind::Additive) {
            const T* __restrict mp = p.memory_proj + (start + j) * A;
            const T* __restrict v = p.v;
            T* __restrict t = tanh_rows.data() + j * A;
            T s = T(0);
#pragma omp simd reduction(+ : s)
            for (int64_t a = 0; a < A; ++a) {
              const T th = additive_tanh(q[a], mp[a]);
              t[a] = th;
              s += v[a] * th;
            }
            prob[j] = s;
          } else {
            prob[j] = q[j];
          }
        }
      }
      T D = T(0);
      for (int64_t j = 0; j < L; ++j) {
        prob[j] = math::exp(prob[j] - lse);
        if (gw != nullptr) ds[j] += gw[j];
        D += prob[j] * ds[j];
      }
      for (int64_t j = 0; j < L; ++j) ds[j] = softmax_backward(prob[j], ds[j], D);
      // dmemory_j += p_j dcontext (+ scale ds_j q for the dot score, where the memory is also the key)
      for (int64_t j = 0; j < L; ++j) {
        T* __restrict gm = p.grad_memory + (start + j) * Dm;
        const T pj = prob[j];
        if constexpr (Kind == ScoreKind::Dot) {
          const T g = p.scale * ds[j];
#pragma omp simd
          for (int64_t d = 0; d < Dm; ++d) gm[d] += pj * go[d] + g * q[d];
        } else {
          axpy(pj, go, gm, Dm);
        }
      }
      if constexpr (Kind == ScoreKind::Dot) {
        for (int64_t j = 0; j < L; ++j) ds[j] *= p.scale;
        add_weighted_rows(p.grad_query + i * Dm, ds.data(), key_rows, L, Dm);
      } else if constexpr (Kind == ScoreKind::Additive) {
        T* __restrict dqp = p.grad_query + i * A;
        T* __restrict dv = p.grad_v + b * A;
        const T* __restrict v = p.v;
        for (int64_t j = 0; j < L; ++j) {
          const T* __restrict t = tanh_rows.data() + j * A;
          T* __restrict dmp = p.grad_memory_proj + (start + j) * A;
          const T dsj = ds[j];
#pragma omp simd
          for (int64_t a = 0; a < A; ++a) {
            const T g = additive_backward(dsj, v[a], t[a], dv[a]);
            dqp[a] += g;
            dmp[a] += g;
          }
        }
      } else {
        std::copy(ds.data(), ds.data() + L, p.grad_query + i * p.query_width);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: dispatch (the checks and the layout are include/seqfast/attention_args.h, shared with
// the CUDA kernels).

using attention::Layout;

template <typename T>
AttentionParams<T> params_of(const Layout& l) {
  AttentionParams<T> p;
  p.batch = l.B;
  p.num_queries = l.Nq;
  p.num_keys = l.Nk;
  p.max_seqlen_k = l.max_seqlen_k;
  p.cu_seqlens_q = l.cu_q_ptr();
  p.cu_seqlens_k = l.cu_k_ptr();
  p.seqused_k = l.used_k_ptr();
  p.seq_of_query = l.seq_of_query.data();
  return p;
}

// Queries per parallel chunk: ~64K multiply-adds of work each.
int64_t query_grain(const Layout& l, int64_t width) {
  const int64_t per_query = std::max<int64_t>(1, (l.Nk / std::max<int64_t>(l.B, 1)) * width);
  return std::max<int64_t>(1, 65536 / per_query);
}

template <typename T, ScoreKind Kind>
void run_forward(const AttentionParams<T>& p, const Layout& l, int64_t width, bool need_weights) {
  at::parallel_for(0, l.Nq, query_grain(l, width), [&](int64_t i0, int64_t i1) {
    if (need_weights) {
      forward_queries<T, Kind, true>(p, i0, i1);
    } else {
      forward_queries<T, Kind, false>(p, i0, i1);
    }
  });
}

template <typename T, ScoreKind Kind>
void run_backward(const AttentionParams<T>& p, const Layout& l) {
  at::parallel_for(0, l.B, 1, [&](int64_t b0, int64_t b1) { backward_sequences<T, Kind>(p, b0, b1); });
}

void check_float(const Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), "seqfast::", op, ": the memory must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "seqfast::", op,
              ": the CPU kernels support float32 and float64, got ", t.scalar_type());
}

// Allocates the forward outputs and points p at them.
template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_outputs(AttentionParams<T>& p, const Layout& l,
                                                   const Tensor& memory, bool need_weights) {
  const auto opts = memory.options();
  Tensor context = at::empty({l.Nq, memory.size(1)}, opts);
  Tensor lse = at::empty({l.Nq}, opts);
  Tensor weights = need_weights ? at::empty({l.Nq, l.max_seqlen_k}, opts) : at::empty({0}, opts);
  p.context = context.data_ptr<T>();
  p.lse = lse.data_ptr<T>();
  p.weights = need_weights ? weights.data_ptr<T>() : nullptr;
  return {context, lse, weights};
}

// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> attention_forward_cpu(
    const Tensor& query, const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, int64_t max_seqlen_k, double scale, bool need_weights) {
  const char* op = "attention_forward";
  check_float(memory, op);
  const Layout l = attention::check_dot(op, query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        max_seqlen_k);
  const Tensor q = query.contiguous(), m = memory.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "attention_forward", [&] {
    AttentionParams<scalar_t> p = params_of<scalar_t>(l);
    attention::set_inputs(p, q, m);
    p.scale = static_cast<scalar_t>(scale);
    auto out = forward_outputs(p, l, m, need_weights);
    run_forward<scalar_t, ScoreKind::Dot>(p, l, 2 * p.Dm, need_weights);
    return out;
  });
}

// The backward of the two families whose kernel reads one query row per query (dot-product scores,
// or the precomputed location scores): returns the gradients of that row and of the memory.
template <ScoreKind Kind>
std::tuple<Tensor, Tensor> query_row_backward(const char* op, const Layout& l,
                                              const Tensor& grad_context,
                                              const OptTensor& grad_weights, const Tensor& query,
                                              const Tensor& memory, const Tensor& lse, double scale) {
  attention::check_backward(op, l, grad_context, grad_weights, memory, lse, memory.scalar_type());
  const Tensor q = query.contiguous(), m = memory.contiguous(), go = grad_context.contiguous();
  const Tensor ls = lse.contiguous();
  const Tensor gw = grad_weights.has_value() ? grad_weights->contiguous() : Tensor();
  Tensor grad_query = at::empty_like(q), grad_memory = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "query_row_backward", [&] {
    AttentionParams<scalar_t> p = params_of<scalar_t>(l);
    attention::set_inputs(p, q, m);
    attention::set_backward_inputs(p, go, gw, ls);
    p.scale = static_cast<scalar_t>(scale);
    p.grad_query = grad_query.data_ptr<scalar_t>();
    p.grad_memory = grad_memory.data_ptr<scalar_t>();
    run_backward<scalar_t, Kind>(p, l);
  });
  return {grad_query, grad_memory};
}

std::tuple<Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query,
    const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k, double scale) {
  const char* op = "attention_backward";
  check_float(memory, op);
  const Layout l = attention::check_dot(op, query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        max_seqlen_k);
  return query_row_backward<ScoreKind::Dot>(op, l, grad_context, grad_weights, query, memory, lse,
                                            scale);
}

std::tuple<Tensor, Tensor, Tensor> additive_attention_forward_cpu(
    const Tensor& query_proj, const Tensor& memory_proj, const Tensor& memory, const Tensor& v,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
    int64_t max_seqlen_k, bool need_weights) {
  const char* op = "additive_attention_forward";
  check_float(memory, op);
  const Layout l = attention::check_additive(op, query_proj, memory_proj, memory, v, cu_seqlens_q,
                                             cu_seqlens_k, seqused_k, max_seqlen_k);
  const int64_t A = query_proj.size(1);
  const Tensor q = query_proj.contiguous(), mp = memory_proj.contiguous(), m = memory.contiguous();
  const Tensor vv = v.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "additive_attention_forward", [&] {
    AttentionParams<scalar_t> p = params_of<scalar_t>(l);
    attention::set_inputs(p, q, m, mp, vv);
    auto out = forward_outputs(p, l, m, need_weights);
    run_forward<scalar_t, ScoreKind::Additive>(p, l, 8 * A + p.Dm, need_weights);
    return out;
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query_proj,
    const Tensor& memory_proj, const Tensor& memory, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const Tensor& lse,
    int64_t max_seqlen_k) {
  const char* op = "additive_attention_backward";
  check_float(memory, op);
  const Layout l = attention::check_additive(op, query_proj, memory_proj, memory, v, cu_seqlens_q,
                                             cu_seqlens_k, seqused_k, max_seqlen_k);
  attention::check_backward(op, l, grad_context, grad_weights, memory, lse, memory.scalar_type());
  const Tensor q = query_proj.contiguous(), mp = memory_proj.contiguous(), m = memory.contiguous();
  const Tensor vv = v.contiguous(), go = grad_context.contiguous(), ls = lse.contiguous();
  const Tensor gw = grad_weights.has_value() ? grad_weights->contiguous() : Tensor();
  const int64_t A = q.size(1);
  Tensor grad_query_proj = at::empty_like(q), grad_memory_proj = at::empty_like(mp);
  Tensor grad_memory = at::empty_like(m);
  Tensor grad_v_partial = at::empty({l.B, A}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "additive_attention_backward", [&] {
    AttentionParams<scalar_t> p = params_of<scalar_t>(l);
    attention::set_inputs(p, q, m, mp, vv);
    attention::set_backward_inputs(p, go, gw, ls);
    p.grad_query = grad_query_proj.data_ptr<scalar_t>();
    p.grad_memory = grad_memory.data_ptr<scalar_t>();
    p.grad_memory_proj = grad_memory_proj.data_ptr<scalar_t>();
    p.grad_v = grad_v_partial.data_ptr<scalar_t>();
    run_backward<scalar_t, ScoreKind::Additive>(p, l);
  });
  return {grad_query_proj, grad_memory_proj, grad_memory, grad_v_partial.sum(0)};
}

std::tuple<Tensor, Tensor, Tensor> location_attention_forward_cpu(
    const Tensor& scores, const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, int64_t max_seqlen_k, bool need_weights) {
  const char* op = "location_attention_forward";
  check_float(memory, op);
  const Layout l = attention::check_location(op, scores, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                             max_seqlen_k);
  const Tensor s = scores.contiguous(), m = memory.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "location_attention_forward", [&] {
    AttentionParams<scalar_t> p = params_of<scalar_t>(l);
    attention::set_inputs(p, s, m);
    auto out = forward_outputs(p, l, m, need_weights);
    run_forward<scalar_t, ScoreKind::Location>(p, l, p.Dm, need_weights);
    return out;
  });
}

std::tuple<Tensor, Tensor> location_attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& scores,
    const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k) {
  const char* op = "location_attention_backward";
  check_float(memory, op);
  const Layout l = attention::check_location(op, scores, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                             max_seqlen_k);
  return query_row_backward<ScoreKind::Location>(op, l, grad_context, grad_weights, scores, memory,
                                                 lse, /*scale=*/1.0);
}

}  // namespace
}  // namespace cpu
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("attention_forward", &seqfast::cpu::attention_forward_cpu);
  m.impl("attention_backward", &seqfast::cpu::attention_backward_cpu);
  m.impl("additive_attention_forward", &seqfast::cpu::additive_attention_forward_cpu);
  m.impl("additive_attention_backward", &seqfast::cpu::additive_attention_backward_cpu);
  m.impl("location_attention_forward", &seqfast::cpu::location_attention_forward_cpu);
  m.impl("location_attention_backward", &seqfast::cpu::location_attention_backward_cpu);
}
