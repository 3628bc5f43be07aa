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
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>
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
// dtypes. T is the storage type of the inputs, A = at::opmath_type<T> the type of every sum and of
// what the kernels write (AttentionParams<T, A>, as in the CUDA kernels): T = A for float32 and
// float64; for bfloat16 and float16 the products of T values are formed and summed in float32, and
// the softmax, lse and all running sums stay float32 (a bfloat16 product is exact in float32, so this
// is "bfloat16 products, float32 accumulation"). The loops below compute in A only: a kernel widens
// what it reads many times once, into per-thread buffers: the memory-side rows of the sequence at
// hand (SequenceRows), the query's row and grad_context row, v.

// One stored element as A. bfloat16 is widened by shifting its bits, which GCC vectorizes (it does
// not see through the memcpy in c10::BFloat16's conversion operator); the rest by their own casts.
template <typename A, typename T>
SEQFAST_CPU_INLINE A widen(T x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<A>(std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16));
  } else {
    return static_cast<A>(x);
  }
}

// x as A values: x itself when T is A, else its conversion into buf (n elements).
template <typename T, typename A>
SEQFAST_CPU_INLINE const A* widened(const T* __restrict x, int64_t n, A* __restrict buf) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) buf[k] = widen<A>(x[k]);
    return buf;
  }
}

// The memory rows (and for concat the memory_proj rows) of one sequence as A values. In storage type
// A they are the inputs themselves; otherwise they are widened when a sequence is first needed and
// reused while the next queries belong to the same sequence: the forward's chunks hold consecutive
// queries and the backward walks one sequence at a time, so each row is widened about once per chunk,
// not once per (query, key) pair.
template <typename T, typename A, ScoreKind Kind>
struct SequenceRows {
  const A* memory = nullptr;       // (L, Dm)
  const A* memory_proj = nullptr;  // (L, width), concat only
  int64_t sequence = -1;
  std::vector<A> memory_buffer, memory_proj_buffer;

  SEQFAST_CPU_INLINE void load(const AttentionParams<T, A>& p, int64_t b, int64_t start, int64_t L) {
    if (b == sequence) return;
    sequence = b;
    const int64_t width = p.query_width;
    if constexpr (!std::is_same_v<T, A>) {
      if (memory_buffer.size() < static_cast<size_t>(L * p.Dm)) memory_buffer.resize(L * p.Dm);
      if (Kind == ScoreKind::Additive && memory_proj_buffer.size() < static_cast<size_t>(L * width)) {
        memory_proj_buffer.resize(L * width);
      }
    }
    memory = widened(p.memory + start * p.Dm, L * p.Dm, memory_buffer.data());
    if constexpr (Kind == ScoreKind::Additive) {
      memory_proj = widened(p.memory_proj + start * width, L * width, memory_proj_buffer.data());
    }
  }
};

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
// Additive score of a query row against one memory_proj row: sum_a v_a tanh(qp_a + mp_a).
// t: where to keep the tanh values (the backward), or nullptr.
template <typename A>
SEQFAST_CPU_INLINE A additive_score(const A* __restrict q, const A* __restrict mp, const A* __restrict v,
                                    int64_t width, A* __restrict t) {
  A s = A(0);
  if (t == nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t a = 0; a < width; ++a) s += v[a] * additive_tanh(q[a], mp[a]);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t a = 0; a < width; ++a) {
      const A th = additive_tanh(q[a], mp[a]);
      t[a] = th;
      s += v[a] * th;
    }
  }
  return s;
}

// Scores of query row i against keys [j0, j0 + n) of its sequence into s. q: the widened query-side
// row (unused by location, whose scores are the row itself); rows: the sequence's widened rows.
template <typename T, typename A, ScoreKind Kind>
SEQFAST_CPU_INLINE void block_scores(const AttentionParams<T, A>& p, int64_t i, const A* __restrict q,
                                     const A* __restrict v, const SequenceRows<T, A, Kind>& rows,
                                     int64_t j0, int64_t n, A* __restrict s) {
  if constexpr (Kind == ScoreKind::Dot) {
    dot_rows(q, rows.memory + j0 * p.Dm, n, p.Dm, s);
    for (int64_t jj = 0; jj < n; ++jj) s[jj] *= p.scale;
  } else if constexpr (Kind == ScoreKind::Additive) {
    const int64_t width = p.query_width;
    for (int64_t jj = 0; jj < n; ++jj) {
      s[jj] = additive_score<A>(q, rows.memory_proj + (j0 + jj) * width, v, width, nullptr);
    }
  } else {
    const T* __restrict scores = p.query + i * p.query_width + j0;
    for (int64_t jj = 0; jj < n; ++jj) s[jj] = widen<A>(scores[jj]);
  }
}

// ------------------------------------------------------------------------------------------------
// Forward of query rows [i0, i1).
template <typename T, typename A, ScoreKind Kind, bool NeedWeights>
SEQFAST_CPU_MULTIVERSION void forward_queries(const AttentionParams<T, A>& p, int64_t i0, int64_t i1) {
  const int64_t Dm = p.Dm, W = p.max_seqlen_k, width = p.query_width;
  const bool widen_query = Kind != ScoreKind::Location;
  std::vector<A> acc_buffer(Dm), query_buffer(widen_query ? width : 0);
  std::vector<A> v_buffer(Kind == ScoreKind::Additive ? width : 0);
  A* __restrict acc = acc_buffer.data();
  const A* v = Kind == ScoreKind::Additive ? widened(p.v, width, v_buffer.data()) : nullptr;
  SequenceRows<T, A, Kind> rows;
  A s_block[kKeyBlock], e_block[kKeyBlock];
  for (int64_t i = i0; i < i1; ++i) {
    int64_t start, L;
    const int64_t b = p.seq_of_query[i];
    p.keys(b, start, L);
    rows.load(p, b, start, L);
    const A* q = widen_query ? widened(p.query + i * width, width, query_buffer.data()) : nullptr;
    A* w = NeedWeights ? p.weights + i * W : nullptr;
    std::fill(acc, acc + Dm, A(0));
    OnlineSoftmax<A> softmax;
    for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
      const int64_t n = std::min(kKeyBlock, L - j0);
      block_scores<T, A, Kind>(p, i, q, v, rows, j0, n, s_block);
      A block_max = -std::numeric_limits<A>::infinity();
      for (int64_t jj = 0; jj < n; ++jj) block_max = s_block[jj] > block_max ? s_block[jj] : block_max;
      const A factor = softmax.rescale(block_max);
      if (factor != A(1)) scale_in_place(factor, acc, Dm);
      if (NeedWeights) std::copy(s_block, s_block + n, w + j0);
      for (int64_t jj = 0; jj < n; ++jj) e_block[jj] = softmax.add(s_block[jj]);
      add_weighted_rows(acc, e_block, rows.memory + j0 * Dm, n, Dm);
    }
    A* __restrict out = p.context + i * Dm;
    const A inv = L > 0 ? A(1) / softmax.sum : A(0);
#pragma omp simd
    for (int64_t d = 0; d < Dm; ++d) out[d] = acc[d] * inv;
    p.lse[i] = softmax.lse();
    if (NeedWeights) {
      for (int64_t j = 0; j < L; ++j) w[j] = softmax.weight(w[j]);
      std::fill(w + L, w + W, A(0));
    }
  }
}

// Backward of the sequences [b0, b1).
template <typename T, typename A, ScoreKind Kind>
SEQFAST_CPU_MULTIVERSION void backward_sequences(const AttentionParams<T, A>& p, int64_t b0,
                                                 int64_t b1) {
  const int64_t Dm = p.Dm, W = p.max_seqlen_k, width = p.query_width;
  const bool widen_query = Kind != ScoreKind::Location;
  std::vector<A> prob(W), ds(W), query_buffer(widen_query ? width : 0), go_buffer(Dm);
  std::vector<A> v_buffer(Kind == ScoreKind::Additive ? width : 0);
  std::vector<A> tanh_rows(Kind == ScoreKind::Additive ? W * width : 0);
  const A* v = Kind == ScoreKind::Additive ? widened(p.v, width, v_buffer.data()) : nullptr;
  SequenceRows<T, A, Kind> rows;
  for (int64_t b = b0; b < b1; ++b) {
    int64_t start, L;
    p.keys(b, start, L);
    // The gradients are allocated uninitialized; every row belongs to exactly one sequence, so zeroing
    // the sequence's rows here (in parallel, right before they are accumulated into) covers them all,
    // padded memory rows included.
    const int64_t q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int64_t k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
    std::fill(p.grad_query + q0 * width, p.grad_query + q1 * width, A(0));
    std::fill(p.grad_memory + k0 * Dm, p.grad_memory + k1 * Dm, A(0));
    if constexpr (Kind == ScoreKind::Additive) {
      std::fill(p.grad_memory_proj + k0 * width, p.grad_memory_proj + k1 * width, A(0));
      std::fill(p.grad_v + b * width, p.grad_v + (b + 1) * width, A(0));
    }
    if (L == 0 || q1 == q0) continue;  // zero context whatever the query, or no query: gradients stay 0
    rows.load(p, b, start, L);
    const A* key_rows = rows.memory;
    for (int64_t i = q0; i < q1; ++i) {
      const A* __restrict q = widen_query ? widened(p.query + i * width, width, query_buffer.data())
                                          : nullptr;
      const A* __restrict go = widened(p.grad_context + i * Dm, Dm, go_buffer.data());
      const T* gw = p.grad_weights != nullptr ? p.grad_weights + i * W : nullptr;
      const A lse = p.saved_lse[i];
      // prob <- scores, ds <- dcontext . m_j
      if constexpr (Kind == ScoreKind::Dot) {
        dot2_rows(q, go, key_rows, L, Dm, prob.data(), ds.data());
        for (int64_t j = 0; j < L; ++j) prob[j] *= p.scale;
      } else {
        dot_rows(go, key_rows, L, Dm, ds.data());
        if constexpr (Kind == ScoreKind::Additive) {
          for (int64_t j = 0; j < L; ++j) {
            prob[j] = additive_score<A>(q, rows.memory_proj + j * width, v, width, tanh_rows.data() + j * width);
          }
        } else {
          block_scores<T, A, Kind>(p, i, q, v, rows, 0, L, prob.data());
        }
      }
      A D = A(0);
      for (int64_t j = 0; j < L; ++j) {
        prob[j] = math::exp(prob[j] - lse);
        if (gw != nullptr) ds[j] += widen<A>(gw[j]);
        D += prob[j] * ds[j];
      }
      for (int64_t j = 0; j < L; ++j) ds[j] = softmax_backward(prob[j], ds[j], D);
      // dmemory_j += p_j dcontext (+ scale ds_j q for the dot score, where the memory is also the key)
      for (int64_t j = 0; j < L; ++j) {
        A* __restrict gm = p.grad_memory + (start + j) * Dm;
        const A pj = prob[j];
        if constexpr (Kind == ScoreKind::Dot) {
          const A g = p.scale * ds[j];
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
        A* __restrict dqp = p.grad_query + i * width;
        A* __restrict dv = p.grad_v + b * width;
        for (int64_t j = 0; j < L; ++j) {
          const A* __restrict t = tanh_rows.data() + j * width;
          A* __restrict dmp = p.grad_memory_proj + (start + j) * width;
          const A dsj = ds[j];
#pragma omp simd
          for (int64_t a = 0; a < width; ++a) {
            const A g = additive_backward(dsj, v[a], t[a], dv[a]);
            dqp[a] += g;
            dmp[a] += g;
          }
        }
      } else {
        std::copy(ds.data(), ds.data() + L, p.grad_query + i * width);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: dispatch (the checks and the layout are include/seqfast/attention_args.h, shared with
// the CUDA kernels). Every entry point holds an ExcludeDispatchKeyGuard over the autocast keys: the
// ATen calls below (empty, contiguous, to, sum) go through the dispatcher, and a kernel must compute
// the same thing whatever autocast state its caller is in (attention_autocast.cpp decides the dtypes
// before the kernel is reached).

using attention::Layout;

template <typename T, typename A>
AttentionParams<T, A> params_of(const Layout& l) {
  AttentionParams<T, A> p;
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

template <typename T, typename A, ScoreKind Kind>
void run_forward(const AttentionParams<T, A>& p, const Layout& l, int64_t width, bool need_weights) {
  at::parallel_for(0, l.Nq, query_grain(l, width), [&](int64_t i0, int64_t i1) {
    if (need_weights) {
      forward_queries<T, A, Kind, true>(p, i0, i1);
    } else {
      forward_queries<T, A, Kind, false>(p, i0, i1);
    }
  });
}

template <typename T, typename A, ScoreKind Kind>
void run_backward(const AttentionParams<T, A>& p, const Layout& l) {
  at::parallel_for(0, l.B, 1, [&](int64_t b0, int64_t b1) { backward_sequences<T, A, Kind>(p, b0, b1); });
}

// The storage types of the CPU kernels; the dispatch below instantiates each kernel for all four.
#define SEQFAST_ATTENTION_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void check_cpu_float(const Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), "seqfast::", op, ": the memory must be on the CPU, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "seqfast::", op, ": the CPU kernels support float32, float64, bfloat16 and float16, got ",
              st);
}

using attention::acc_empty;

// Runs the forward into results in A; returns them converted to the memory's dtype, but lse, which
// stays in A (float32 for the half types, like the CUDA kernels' lse).
template <typename T, typename A, ScoreKind Kind>
std::tuple<Tensor, Tensor, Tensor> forward(AttentionParams<T, A>& p, const Layout& l, const Tensor& memory,
                                           int64_t width, bool need_weights) {
  auto [context, lse, weights] = attention::forward_results(p, l, memory, need_weights);
  run_forward<T, A, Kind>(p, l, width, need_weights);
  const auto st = memory.scalar_type();
  return {context.to(st), lse, weights.to(st)};
}

// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> attention_forward_cpu(
    const Tensor& query, const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, int64_t max_seqlen_k, double scale, bool need_weights) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "attention_forward";
  check_cpu_float(memory, op);
  const Layout l = attention::check_dot(op, query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        max_seqlen_k);
  const Tensor q = query.contiguous(), m = memory.contiguous();
  return SEQFAST_ATTENTION_DISPATCH(m.scalar_type(), "attention_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p = params_of<scalar_t, A>(l);
    attention::set_inputs(p, q, m);
    p.scale = static_cast<A>(scale);
    return forward<scalar_t, A, ScoreKind::Dot>(p, l, m, 2 * p.Dm, need_weights);
  });
}

// The backward of the two families whose kernel reads one query row per query (dot-product scores,
// or the precomputed location scores): returns the gradients of that row and of the memory.
template <ScoreKind Kind>
std::tuple<Tensor, Tensor> query_row_backward(const char* op, const Layout& l,
                                              const Tensor& grad_context,
                                              const OptTensor& grad_weights, const Tensor& query,
                                              const Tensor& memory, const Tensor& lse, double scale) {
  attention::check_backward(op, l, grad_context, grad_weights, memory, lse,
                            at::toOpMathType(memory.scalar_type()));
  const Tensor q = query.contiguous(), m = memory.contiguous(), go = grad_context.contiguous();
  const Tensor ls = lse.contiguous();
  const Tensor gw = grad_weights.has_value() ? grad_weights->contiguous() : Tensor();
  return SEQFAST_ATTENTION_DISPATCH(m.scalar_type(), "query_row_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p = params_of<scalar_t, A>(l);
    attention::set_inputs(p, q, m);
    attention::set_backward_inputs(p, go, gw, ls);
    p.scale = static_cast<A>(scale);
    Tensor grad_query = acc_empty<A>(q.sizes(), m), grad_memory = acc_empty<A>(m.sizes(), m);
    p.grad_query = grad_query.data_ptr<A>();
    p.grad_memory = grad_memory.data_ptr<A>();
    run_backward<scalar_t, A, Kind>(p, l);
    return std::make_tuple(grad_query.to(m.scalar_type()), grad_memory.to(m.scalar_type()));
  });
}

std::tuple<Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query,
    const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k, double scale) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "attention_backward";
  check_cpu_float(memory, op);
  const Layout l = attention::check_dot(op, query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        max_seqlen_k);
  return query_row_backward<ScoreKind::Dot>(op, l, grad_context, grad_weights, query, memory, lse,
                                            scale);
}

std::tuple<Tensor, Tensor, Tensor> additive_attention_forward_cpu(
    const Tensor& query_proj, const Tensor& memory_proj, const Tensor& memory, const Tensor& v,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
    int64_t max_seqlen_k, bool need_weights) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "additive_attention_forward";
  check_cpu_float(memory, op);
  const Layout l = attention::check_additive(op, query_proj, memory_proj, memory, v, cu_seqlens_q,
                                             cu_seqlens_k, seqused_k, max_seqlen_k);
  const int64_t width = query_proj.size(1);
  const Tensor q = query_proj.contiguous(), mp = memory_proj.contiguous(), m = memory.contiguous();
  const Tensor vv = v.contiguous();
  return SEQFAST_ATTENTION_DISPATCH(m.scalar_type(), "additive_attention_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p = params_of<scalar_t, A>(l);
    attention::set_inputs(p, q, m, mp, vv);
    return forward<scalar_t, A, ScoreKind::Additive>(p, l, m, 8 * width + p.Dm, need_weights);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query_proj,
    const Tensor& memory_proj, const Tensor& memory, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const Tensor& lse,
    int64_t max_seqlen_k) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "additive_attention_backward";
  check_cpu_float(memory, op);
  const Layout l = attention::check_additive(op, query_proj, memory_proj, memory, v, cu_seqlens_q,
                                             cu_seqlens_k, seqused_k, max_seqlen_k);
  attention::check_backward(op, l, grad_context, grad_weights, memory, lse,
                            at::toOpMathType(memory.scalar_type()));
  const Tensor q = query_proj.contiguous(), mp = memory_proj.contiguous(), m = memory.contiguous();
  const Tensor vv = v.contiguous(), go = grad_context.contiguous(), ls = lse.contiguous();
  const Tensor gw = grad_weights.has_value() ? grad_weights->contiguous() : Tensor();
  return SEQFAST_ATTENTION_DISPATCH(m.scalar_type(), "additive_attention_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p = params_of<scalar_t, A>(l);
    attention::set_inputs(p, q, m, mp, vv);
    attention::set_backward_inputs(p, go, gw, ls);
    Tensor grad_query_proj = acc_empty<A>(q.sizes(), m), grad_memory_proj = acc_empty<A>(mp.sizes(), m);
    Tensor grad_memory = acc_empty<A>(m.sizes(), m);
    Tensor grad_v_partial = acc_empty<A>({l.B, q.size(1)}, m);  // per sequence; summed below
    p.grad_query = grad_query_proj.data_ptr<A>();
    p.grad_memory = grad_memory.data_ptr<A>();
    p.grad_memory_proj = grad_memory_proj.data_ptr<A>();
    p.grad_v = grad_v_partial.data_ptr<A>();
    run_backward<scalar_t, A, ScoreKind::Additive>(p, l);
    const auto st = m.scalar_type();
    return std::make_tuple(grad_query_proj.to(st), grad_memory_proj.to(st), grad_memory.to(st),
                           grad_v_partial.sum(0).to(st));
  });
}

std::tuple<Tensor, Tensor, Tensor> location_attention_forward_cpu(
    const Tensor& scores, const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, int64_t max_seqlen_k, bool need_weights) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "location_attention_forward";
  check_cpu_float(memory, op);
  const Layout l = attention::check_location(op, scores, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                             max_seqlen_k);
  const Tensor s = scores.contiguous(), m = memory.contiguous();
  return SEQFAST_ATTENTION_DISPATCH(m.scalar_type(), "location_attention_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    AttentionParams<scalar_t, A> p = params_of<scalar_t, A>(l);
    attention::set_inputs(p, s, m);
    return forward<scalar_t, A, ScoreKind::Location>(p, l, m, p.Dm, need_weights);
  });
}

std::tuple<Tensor, Tensor> location_attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& scores,
    const Tensor& memory, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const Tensor& lse, int64_t max_seqlen_k) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "location_attention_backward";
  check_cpu_float(memory, op);
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
