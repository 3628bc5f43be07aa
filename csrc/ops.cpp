// Every seqfast operator schema, in one place. Kernels are registered per backend in csrc/cpu and
// csrc/cuda (TORCH_LIBRARY_IMPL); autograd and fake (meta) implementations live in seqfast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(seqfast, m) {
  // One recurrent layer in one direction, the whole time loop in one call.
  //   input:       (T, B, I) time-major padded when batch_sizes is None, else (N, I) packed data
  //   batch_sizes: None, or int64 CPU (T,) non-increasing, as in PackedSequence
  //   hx: (B, P) initial hidden state, P = proj_size or hidden_size; cx: (B, H) for LSTM, else None
  //   w_ih (G*H, I), w_hh (G*H, P), b_ih/b_hh (G*H) or None, w_hr (P, H) or None; G = 4/3/1
  //   mode: 0 LSTM, 1 GRU, 2 RNN tanh, 3 RNN relu; reverse: run t = T-1 .. 0 (each packed sequence
  //   from its own last element); training: save the workspace the backward needs (the autograd
  //   kernel sets it whenever it records a backward node, so False is only a hint for inference).
  // Returns output (input's leading dims, P), hy (B, P), cy (B, H) or empty, workspace (flat).
  m.def(
      "recurrent_layer_forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor? cx, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, int mode, bool reverse, "
      "bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of recurrent_layer_forward. grad_cy is None for GRU/RNN. Returns grad_input, grad_hx,
  // grad_cx (empty for GRU/RNN), grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr (the bias and
  // projection gradients are empty when those parameters are None). input_grad=False skips the
  // (N, G*H) x (G*H, I) GEMM of grad_input, which is then empty: a first layer fed by data does not
  // need it.
  m.def(
      "recurrent_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor? grad_cy, Tensor input, "
      "Tensor? batch_sizes, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor output, Tensor workspace, int mode, bool reverse, "
      "bool input_grad=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // One step of a cell: recurrent_layer_forward at T = 1 for unpacked (B, I) input, returning
  // hy (B, P) and cy (B, H) or empty. The CPU kernel (cpu/cell_step_kernel.cpp) computes tiny steps
  // without the layer op's per-call allocations; its autograd kernel (autograd.cpp) sends every call
  // that needs a graph to recurrent_layer_forward, whose backward it shares.
  m.def(
      "cell_forward(Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, int mode) -> (Tensor, Tensor)");

  // recurrent_layer_backward for one unpacked step (T = 1, no projection, not reversed): arguments as
  // there, but grad_output/grad_hy may be None (no gradient reached them). input (1, B, I), output
  // (1, B, H). Returns grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh (empty
  // as there). The layer op's backward node calls it for such steps (autograd.cpp).
  m.def(
      "cell_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, "
      "Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor output, "
      "Tensor workspace, int mode, bool input_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- Attention over packed (varlen) memory; layout and math in include/seqfast/attention.h. ----
  // Common arguments:
  //   cu_seqlens_q: int32 CPU (B+1), query rows of sequence b are [cu_seqlens_q[b], cu_seqlens_q[b+1])
  //   cu_seqlens_k: int32 CPU (B+1), memory rows of sequence b start at cu_seqlens_k[b]
  //   seqused_k:    None (sequence b owns all rows up to cu_seqlens_k[b+1]) or int32 CPU (B) keys used
  //                 per sequence (padded memory: cu_seqlens_k = b*Tk, seqused_k = lengths)
  //   max_seqlen_k: width of the weights rows, >= every used length
  //   memory: (Nk, Dm) values. need_weights: also return the softmax weights.
  // Forward ops return context (Nq, Dm), lse (Nq) log-sum-exp of each query's scores (-inf for a
  // length-0 memory, whose context is 0), weights (Nq, max_seqlen_k) zero past each length, or an
  // empty tensor when need_weights is false. Backward ops take grad_weights=None when the weights
  // were not returned or got no gradient.
  //
  // dot, scaled_dot and general (query already multiplied by W): score = scale * query . memory.
  //   query (Nq, Dm). Returns context, lse, weights.
  m.def(
      "attention_forward(Tensor query, Tensor memory, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? seqused_k, int max_seqlen_k, float scale, bool need_weights) -> (Tensor, Tensor, Tensor)");
  // Returns grad_query, grad_memory.
  m.def(
      "attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor query, Tensor memory, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, Tensor lse, int max_seqlen_k, "
      "float scale) -> (Tensor, Tensor)");
  // concat (Bahdanau): score = v . tanh(query_proj_i + memory_proj_j), never materialized per pair.
  //   query_proj (Nq, A) = query W_q^T, memory_proj (Nk, A) = memory W_m^T (+ b), v (A).
  m.def(
      "additive_attention_forward(Tensor query_proj, Tensor memory_proj, Tensor memory, Tensor v, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, int max_seqlen_k, "
      "bool need_weights) -> (Tensor, Tensor, Tensor)");
  // Returns grad_query_proj, grad_memory_proj, grad_memory, grad_v.
  m.def(
      "additive_attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor query_proj, "
      "Tensor memory_proj, Tensor memory, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? seqused_k, Tensor lse, int max_seqlen_k) -> (Tensor, Tensor, Tensor, Tensor)");
  // location: the scores are given, scores (Nq, L) = query W^T, L = max_memory_len; key j of a
  //   sequence takes column j. Errors if a memory length exceeds L.
  m.def(
      "location_attention_forward(Tensor scores, Tensor memory, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, Tensor? seqused_k, int max_seqlen_k, bool need_weights) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns grad_scores (zero past each length), grad_memory.
  m.def(
      "location_attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor scores, "
      "Tensor memory, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, Tensor lse, "
      "int max_seqlen_k) -> (Tensor, Tensor)");
}

// seqfast._C is imported only for its static registrations above; give Python an empty module.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
