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
  //   from its own last element); training: save the workspace the backward needs.
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
}

// seqfast._C is imported only for its static registrations above; give Python an empty module.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
