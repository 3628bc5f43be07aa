// CUDA kernels of seqfast::cell_forward / cell_backward: the layer op at T = 1 (its CUDA kernels), so
// every seqfast op has a CUDA kernel. The modules take these ops only for CPU tensors (seqfast/nn/rnn.py);
// a tiny-step CUDA kernel like the CPU one (csrc/cpu/cell_step_kernel.cpp) is not written.
#include <torch/library.h>

#include "seqfast/op_handles.h"

TORCH_LIBRARY_IMPL(seqfast, CUDA, m) {
  m.impl("cell_forward", &seqfast::ops::cell_forward_by_layer_op);
  m.impl("cell_backward", &seqfast::ops::cell_backward_by_layer_op);
}
