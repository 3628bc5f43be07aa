#pragma once
// What the CPU and CUDA kernels of the seqfast attention ops share: the varlen layout, the per-element
// score math (dot, additive) and the streaming-softmax bookkeeping, forward and backward.
//
// Varlen layout (FlashAttention's flash_attn_varlen_func contract, plus its `seqused_k`):
//   queries  (Nq, Dq') tokens of sequence b at rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
//   memory   (Nk, Dm)  sequence b starts at row cu_seqlens_k[b] and uses
//                      seqused_k[b] rows when seqused_k is given (padded memory: cu_seqlens_k = b*Tk,
//                      seqused_k = lengths, the padding is never read), else cu_seqlens_k[b+1] - that.
// Scores of query i (in sequence b) against key j of the same sequence:
//   dot:      s = scale * q_i . m_j                                  (general: q_i is already q W)
//   additive: s = sum_a v_a tanh(qp_ia + mp_ja)                      (qp = W_q q, mp = W_m m + b)
//   location: s = scores_ij, given                                   (scores = W q)
// Then p = softmax_j(s) over the sequence's keys, context_i = sum_j p_j m_j, lse_i = log sum_j e^{s_j}.
// The backward recomputes p = exp(s - lse) and uses
//   dp_j = dcontext_i . m_j (+ dweights_ij),  D_i = sum_j p_j dp_j,  ds_j = p_j (dp_j - D_i).
//
// No torch dependency: host+device inline functions only.

#include <cstdint>

#include "seqfast/gates.h"
#include "seqfast/macros.h"

namespace seqfast {

// Same numbering in every kernel; the Python side picks the op, not the kind.
enum class ScoreKind : int { Dot = 0, Additive = 1, Location = 2 };

// Key rows [start, start + length) of sequence b. Returns false when seqused_k exceeds the rows the
// sequence owns (the caller reports it).
SEQFAST_INLINE bool key_range(const int32_t* cu_seqlens_k, const int32_t* seqused_k, int64_t b,
                              int64_t& start, int64_t& length) {
  start = cu_seqlens_k[b];
  const int64_t capacity = static_cast<int64_t>(cu_seqlens_k[b + 1]) - start;
  length = seqused_k != nullptr ? static_cast<int64_t>(seqused_k[b]) : capacity;
  return length >= 0 && length <= capacity;
}

// ---------------------------------------------------------------------------------------------------
// Everything a kernel needs, filled once by the host entry point. T is the storage type of the inputs,
// A the type of what the kernels write (their accumulators): the CPU kernels use A = T; the CUDA
// kernels A = float for float16/bfloat16 (the host converts the results afterwards).
template <typename T, typename A = T>
struct AttentionParams {
  int64_t batch = 0;         // B
  int64_t num_queries = 0;   // Nq
  int64_t num_keys = 0;      // Nk, memory rows
  int64_t max_seqlen_k = 0;  // width of the weights rows (>= every sequence's key count)
  const int32_t* cu_seqlens_q = nullptr;  // (B+1) query rows of sequence b: [cu[b], cu[b+1])
  const int32_t* cu_seqlens_k = nullptr;  // (B+1) first memory row of sequence b
  const int32_t* seqused_k = nullptr;     // (B) keys used per sequence, or nullptr (see above)
  const int32_t* seq_of_query = nullptr;  // (Nq) sequence index of every query row (CPU only)

  const T* query = nullptr;  // dot: (Nq, Dm) | additive: query_proj (Nq, A) | location: scores (Nq, L)
  int64_t query_width = 0;   // Dm | A | L
  const T* memory = nullptr;       // (Nk, Dm) values; also the keys of the dot score
  int64_t Dm = 0;
  const T* memory_proj = nullptr;  // additive: (Nk, A)
  const T* v = nullptr;            // additive: (A)
  A scale = A(1);                  // dot: score multiplier

  A* context = nullptr;  // (Nq, Dm)
  A* lse = nullptr;      // (Nq) log-sum-exp of each query's scores; -inf without keys
  A* weights = nullptr;  // (Nq, max_seqlen_k), or nullptr when not requested

  const T* grad_context = nullptr;  // (Nq, Dm)
  const T* grad_weights = nullptr;  // (Nq, max_seqlen_k) or nullptr
  const A* saved_lse = nullptr;     // (Nq) the forward's lse, in the backward
  A* grad_query = nullptr;          // like query (zeroed by the kernels, like all the gradients)
  A* grad_memory = nullptr;         // (Nk, Dm)
  A* grad_memory_proj = nullptr;    // additive: (Nk, A)
  A* grad_v = nullptr;              // additive: per-sequence (CPU, (B, A)) or per-key (CUDA, (Nk, A))
                                    // partial sums; the host adds them up
  A* softmax_dot = nullptr;         // CUDA backward scratch: (Nq) D_i = sum_j p_ij dL/dp_ij

  SEQFAST_INLINE void keys(int64_t b, int64_t& start, int64_t& length) const {
    key_range(cu_seqlens_k, seqused_k, b, start, length);
  }
};

// The sequence b whose rows [cu_seqlens[b], cu_seqlens[b+1]) hold `row` (empty sequences skipped):
// the last b with cu_seqlens[b] <= row. cu_seqlens has B+1 non-decreasing entries, row < cu_seqlens[B].
SEQFAST_INLINE int64_t sequence_of_row(const int32_t* cu_seqlens, int64_t B, int64_t row) {
  int64_t lo = 0, hi = B;  // invariant: cu_seqlens[lo] <= row < cu_seqlens[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_seqlens[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------------
// Additive (Bahdanau) score, one attention unit a: its term of s and, in the backward, of the
// gradients. t = tanh(qp_a + mp_a) is recomputed in the forward and stored per query in the backward.
template <typename T>
SEQFAST_INLINE T additive_tanh(T qp, T mp) {
  return math::tanh(qp + mp);
}

// ds: dL/ds for this (query, key) pair. Returns dL/d(qp_a + mp_a).
template <typename T>
SEQFAST_INLINE T additive_pre_grad(T ds, T v, T t) {
  return ds * v * (T(1) - t * t);
}

// The same, and adds this pair's term ds * t to dv_a.
template <typename T>
SEQFAST_INLINE T additive_backward(T ds, T v, T t, T& dv) {
  dv += ds * t;
  return additive_pre_grad(ds, v, t);
}

// ---------------------------------------------------------------------------------------------------
// Streaming softmax of one query row: a running maximum and the sum of e^{s - max}. Keys arrive in
// blocks; before a block is added the accumulated context is multiplied by rescale().
template <typename T>
struct OnlineSoftmax {
  T max;  // running maximum; -inf before the first key
  T sum;  // sum of e^{s_j - max}

  SEQFAST_HOST_DEVICE OnlineSoftmax() : max(-__builtin_inf()), sum(T(0)) {}

  // Moves the maximum to include block_max; returns the factor to scale what was accumulated so far.
  SEQFAST_INLINE T rescale(T block_max) {
    if (!(block_max > max)) return T(1);
    const T factor = max == -__builtin_inf() ? T(0) : math::exp(max - block_max);
    max = block_max;
    sum *= factor;
    return factor;
  }

  // e^{s - max} of one key of the current block, added to the sum.
  SEQFAST_INLINE T add(T s) {
    const T e = shifted_exp(s);
    sum += e;
    return e;
  }

  // The same for a block whose terms e^{s - max} the caller computed (after rescale) and summed.
  SEQFAST_INLINE void add_block_sum(T block_sum) { sum += block_sum; }
  SEQFAST_INLINE T shifted_exp(T s) const { return math::exp(s - max); }

  // log sum_j e^{s_j}; -inf when the sequence has no keys.
  SEQFAST_INLINE T lse() const {
    return sum > T(0) ? max + static_cast<T>(::log(static_cast<double>(sum))) : T(-__builtin_inf());
  }

  // The softmax weight of a key with score s, once every key was added. Exactly 1 for a single key.
  SEQFAST_INLINE T weight(T s) const { return math::exp(s - max) / sum; }
};

// dL/ds_j from the recomputed p_j, dL/dp_j and D = sum_j p_j dL/dp_j.
template <typename T>
SEQFAST_INLINE T softmax_backward(T p, T dp, T D) {
  return p * (dp - D);
}

}  // namespace seqfast
