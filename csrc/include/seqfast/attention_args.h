#pragma once
// Argument handling of the seqfast attention ops shared by the CPU and CUDA kernels: the varlen layout
// read (on the host, once per call) from the CPU index tensors, and the shape/dtype/device checks of
// each op. Each backend adds its own dtype check.

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "seqfast/attention.h"

namespace seqfast {
namespace attention {

using OptTensor = std::optional<at::Tensor>;

// t is (rows, features) with the dtype and device of `like` (the memory).
inline void check_rows(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2, "seqfast::", op, ": ", name, " must be 2-D (rows, features), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "seqfast::", op, ": ", name, " must be on ", like.device(),
              " like the memory, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "seqfast::", op, ": ", name, " must be ",
              like.scalar_type(), " like the other inputs, got ", t.scalar_type());
}

inline void check_offsets(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt && t.device().is_cpu(), "seqfast::", op,
              ": ", name, " must be a 1-D int32 CPU tensor (B+1 offsets, FlashAttention's varlen "
              "contract), got ", t.dim(), "-D ", t.scalar_type(), " on ", t.device());
}

// The validated varlen layout; owns contiguous CPU copies of the index tensors.
struct Layout {
  at::Tensor cu_q, cu_k, used_k;          // int32 CPU; used_k undefined when seqused_k is None
  std::vector<int32_t> seq_of_query;      // (Nq) sequence of every query row
  int64_t B = 0, Nq = 0, Nk = 0, max_seqlen_k = 0;

  const int32_t* cu_q_ptr() const { return cu_q.data_ptr<int32_t>(); }
  const int32_t* cu_k_ptr() const { return cu_k.data_ptr<int32_t>(); }
  const int32_t* used_k_ptr() const { return used_k.defined() ? used_k.data_ptr<int32_t>() : nullptr; }
};

// Validates the index tensors against Nq query rows and Nk memory rows. score_width: for location
// attention, the width L of the given scores (every length must be <= L); -1 otherwise.
inline Layout make_layout(const char* op, int64_t Nq, int64_t Nk, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& cu_seqlens_k, const OptTensor& seqused_k,
                          int64_t max_seqlen_k, int64_t score_width = -1) {
  check_offsets(cu_seqlens_q, op, "cu_seqlens_q");
  check_offsets(cu_seqlens_k, op, "cu_seqlens_k");
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel() && cu_seqlens_q.numel() >= 1, "seqfast::",
              op, ": cu_seqlens_q and cu_seqlens_k must both have B+1 entries, got ",
              cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  TORCH_CHECK(max_seqlen_k >= 0, "seqfast::", op, ": max_seqlen_k must be >= 0, got ", max_seqlen_k);
  Layout l;
  l.B = cu_seqlens_q.numel() - 1;
  l.Nq = Nq;
  l.Nk = Nk;
  l.max_seqlen_k = max_seqlen_k;
  l.cu_q = cu_seqlens_q.contiguous();
  l.cu_k = cu_seqlens_k.contiguous();
  const int32_t* cq = l.cu_q_ptr();
  const int32_t* ck = l.cu_k_ptr();
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0, "seqfast::", op, ": cu_seqlens must start at 0");
  TORCH_CHECK(cq[l.B] == Nq, "seqfast::", op, ": cu_seqlens_q ends at ", cq[l.B], " but there are ",
              Nq, " query rows");
  TORCH_CHECK(ck[l.B] == Nk, "seqfast::", op, ": cu_seqlens_k ends at ", ck[l.B], " but there are ",
              Nk, " memory rows");
  if (seqused_k.has_value()) {
    TORCH_CHECK(seqused_k->dim() == 1 && seqused_k->numel() == l.B &&
                    seqused_k->scalar_type() == at::kInt && seqused_k->device().is_cpu(),
                "seqfast::", op, ": seqused_k (the memory lengths) must be a 1-D int32 CPU tensor of ",
                l.B, " entries, got shape ", seqused_k->sizes(), " ", seqused_k->scalar_type());
    l.used_k = seqused_k->contiguous();
  }
  const int32_t* used = l.used_k_ptr();
  l.seq_of_query.resize(Nq);
  for (int64_t b = 0; b < l.B; ++b) {
    TORCH_CHECK(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "seqfast::", op,
                ": cu_seqlens must be non-decreasing (sequence ", b, ")");
    int64_t start, length;
    TORCH_CHECK(key_range(ck, used, b, start, length), "seqfast::", op, ": memory_lengths[", b,
                "] = ", length, " is outside [0, ", ck[b + 1] - ck[b],
                "], the padded memory length");
    TORCH_CHECK(score_width < 0 || length <= score_width, "seqfast: location attention: memory "
                "length ", length, " of sequence ", b, " exceeds max_memory_len = ", score_width,
                ". Build the Attention module with max_memory_len >= the longest memory.");
    TORCH_CHECK(length <= max_seqlen_k, "seqfast::", op, ": sequence ", b, " has ", length,
                " memory rows but max_seqlen_k is ", max_seqlen_k);
    for (int64_t i = cq[b]; i < cq[b + 1]; ++i) l.seq_of_query[i] = static_cast<int32_t>(b);
  }
  return l;
}

inline void check_grad_weights(const OptTensor& gw, const Layout& l, const at::Tensor& memory,
                               const char* op) {
  if (!gw.has_value()) return;
  TORCH_CHECK(gw->dim() == 2 && gw->size(0) == l.Nq && gw->size(1) == l.max_seqlen_k, "seqfast::",
              op, ": grad_weights must have shape (", l.Nq, ", ", l.max_seqlen_k, "), got ",
              gw->sizes());
  check_rows(*gw, op, "grad_weights", memory);
}

// ------------------------------------------------------------------------------------------------
// Per-op checks (the backends call these first, then add their dtype check). Each returns the layout.

// dot / scaled_dot / general: query (Nq, Dm) against memory (Nk, Dm).
inline Layout check_dot(const char* op, const at::Tensor& query, const at::Tensor& memory,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                        const OptTensor& seqused_k, int64_t max_seqlen_k) {
  check_rows(memory, op, "memory", memory);
  check_rows(query, op, "query", memory);
  TORCH_CHECK(query.size(1) == memory.size(1), "seqfast::", op, ": the query (after the `general` "
              "projection) and the memory must have the same width, got ", query.size(1), " and ",
              memory.size(1));
  return make_layout(op, query.size(0), memory.size(0), cu_seqlens_q, cu_seqlens_k, seqused_k,
                     max_seqlen_k);
}

// concat: query_proj (Nq, A), memory_proj (Nk, A), memory (Nk, Dm), v (A).
inline Layout check_additive(const char* op, const at::Tensor& query_proj, const at::Tensor& memory_proj,
                             const at::Tensor& memory, const at::Tensor& v,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                             const OptTensor& seqused_k, int64_t max_seqlen_k) {
  check_rows(memory, op, "memory", memory);
  check_rows(query_proj, op, "query_proj", memory);
  check_rows(memory_proj, op, "memory_proj", memory);
  const int64_t A = query_proj.size(1);
  TORCH_CHECK(memory_proj.size(0) == memory.size(0) && memory_proj.size(1) == A && v.dim() == 1 &&
                  v.size(0) == A && v.scalar_type() == memory.scalar_type() &&
                  v.device() == memory.device(),
              "seqfast::", op, ": expected memory_proj (", memory.size(0), ", ", A, ") and v (", A,
              ") like the memory, got ", memory_proj.sizes(), " and ", v.sizes(), " on ", v.device());
  return make_layout(op, query_proj.size(0), memory.size(0), cu_seqlens_q, cu_seqlens_k, seqused_k,
                     max_seqlen_k);
}

// location: scores (Nq, L) given, memory (Nk, Dm); every length must be <= L.
inline Layout check_location(const char* op, const at::Tensor& scores, const at::Tensor& memory,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                             const OptTensor& seqused_k, int64_t max_seqlen_k) {
  check_rows(memory, op, "memory", memory);
  check_rows(scores, op, "scores", memory);
  return make_layout(op, scores.size(0), memory.size(0), cu_seqlens_q, cu_seqlens_k, seqused_k,
                     max_seqlen_k, scores.size(1));
}

// The backward's extra inputs: grad_context (Nq, Dm), grad_weights, and lse (Nq) in `lse_dtype`.
inline void check_backward(const char* op, const Layout& l, const at::Tensor& grad_context,
                           const OptTensor& grad_weights, const at::Tensor& memory, const at::Tensor& lse,
                           at::ScalarType lse_dtype) {
  check_rows(grad_context, op, "grad_context", memory);
  TORCH_CHECK(grad_context.size(0) == l.Nq && grad_context.size(1) == memory.size(1), "seqfast::", op,
              ": grad_context must have shape (", l.Nq, ", ", memory.size(1), "), got ",
              grad_context.sizes());
  check_grad_weights(grad_weights, l, memory, op);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == l.Nq && lse.scalar_type() == lse_dtype &&
                  lse.device() == memory.device(),
              "seqfast::", op, ": lse must be the (", l.Nq, ",) ", lse_dtype,
              " log-sum-exp the forward returned, got shape ", lse.sizes(), " ", lse.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// Filling the kernel parameters (both backends). Tensors are contiguous, of the storage type T.

// The query-side rows (query, query_proj or scores) and the memory; for concat also memory_proj and v
// (undefined tensors leave their pointers null).
template <typename T, typename A>
void set_inputs(AttentionParams<T, A>& p, const at::Tensor& query, const at::Tensor& memory,
                const at::Tensor& memory_proj = at::Tensor(), const at::Tensor& v = at::Tensor()) {
  p.query = query.data_ptr<T>();
  p.query_width = query.size(1);
  p.memory = memory.data_ptr<T>();
  p.Dm = memory.size(1);
  p.memory_proj = memory_proj.defined() ? memory_proj.data_ptr<T>() : nullptr;
  p.v = v.defined() ? v.data_ptr<T>() : nullptr;
}

// The backward's extra inputs; grad_weights undefined when None; lse in A.
template <typename T, typename A>
void set_backward_inputs(AttentionParams<T, A>& p, const at::Tensor& grad_context,
                         const at::Tensor& grad_weights, const at::Tensor& lse) {
  p.grad_context = grad_context.data_ptr<T>();
  p.grad_weights = grad_weights.defined() ? grad_weights.data_ptr<T>() : nullptr;
  p.saved_lse = lse.data_ptr<A>();
}

// ------------------------------------------------------------------------------------------------
// Results. Both backends write every result in A (float32 for the half types) and convert the
// context, weights and gradients to the inputs' dtype afterwards; lse stays in A.

// An uninitialized tensor in the kernels' result type A, on the device of `like`.
template <typename A>
at::Tensor acc_empty(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::empty(sizes, like.options().dtype(c10::CppTypeToScalarType<A>::value));
}

// The forward's results in A, with p pointed at them: context (Nq, Dm), lse (Nq), weights
// (Nq, max_seqlen_k) or an empty tensor in the memory's dtype when not requested.
template <typename T, typename A>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_results(AttentionParams<T, A>& p, const Layout& l,
                                                               const at::Tensor& memory, bool need_weights) {
  at::Tensor context = acc_empty<A>({l.Nq, memory.size(1)}, memory);
  at::Tensor lse = acc_empty<A>({l.Nq}, memory);
  at::Tensor weights = need_weights ? acc_empty<A>({l.Nq, l.max_seqlen_k}, memory)
                                    : at::empty({0}, memory.options());
  p.context = context.data_ptr<A>();
  p.lse = lse.data_ptr<A>();
  p.weights = need_weights ? weights.data_ptr<A>() : nullptr;
  return {context, lse, weights};
}

}  // namespace attention
}  // namespace seqfast
