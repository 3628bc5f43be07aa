#pragma once
// Argument handling of seqfast::recurrent_layer_{forward,backward} shared by the CPU and CUDA kernels:
// the time-major schedule read from batch_sizes (on the host, once per call) and the shape/dtype/device
// checks. Each backend adds its own dtype check.

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "seqfast/recurrent.h"

namespace seqfast {

using OptTensor = std::optional<at::Tensor>;

// ------------------------------------------------------------------------------------------------
// Time-major packed schedule: step t covers token rows [offset[t], offset[t] + batch[t]).
struct Schedule {
  std::vector<int64_t> batch;
  std::vector<int64_t> offset;
  int64_t tokens = 0;
  int64_t max_batch = 0;
  int64_t steps() const { return static_cast<int64_t>(batch.size()); }
};

inline Schedule make_schedule(const at::Tensor& input, const OptTensor& batch_sizes) {
  Schedule s;
  if (!batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 3, "seqfast: padded input must be 3-D (T, B, I), got ", input.dim(),
                "-D");
    const int64_t T = input.size(0), B = input.size(1);
    s.batch.assign(T, B);
    s.offset.resize(T);
    for (int64_t t = 0; t < T; ++t) s.offset[t] = t * B;
    s.tokens = T * B;
    s.max_batch = B;
  } else {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(input.dim() == 2, "seqfast: packed input data must be 2-D (N, I), got ", input.dim(),
                "-D");
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "seqfast: batch_sizes must be a 1-D int64 CPU tensor (as in PackedSequence), got ",
                bs.dim(), "-D ", bs.scalar_type(), " on ", bs.device());
    const at::Tensor bs_c = bs.contiguous();
    const int64_t* p = bs_c.data_ptr<int64_t>();
    const int64_t T = bs_c.numel();
    s.batch.resize(T);
    s.offset.resize(T);
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p[t] > 0, "seqfast: batch_sizes must be positive, got ", p[t], " at step ", t);
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1],
                  "seqfast: batch_sizes must be non-increasing (sequences sorted by length, as "
                  "pack_padded_sequence makes them), got ", p[t - 1 < 0 ? 0 : t - 1], " then ", p[t],
                  " at step ", t);
      s.batch[t] = p[t];
      s.offset[t] = total;
      total += p[t];
    }
    TORCH_CHECK(total == input.size(0), "seqfast: batch_sizes sum to ", total,
                " but the packed data has ", input.size(0), " rows");
    s.tokens = total;
    s.max_batch = T > 0 ? p[0] : 0;
  }
  TORCH_CHECK(s.steps() > 0, "Expected sequence length to be larger than 0 in RNN");
  return s;
}

// ------------------------------------------------------------------------------------------------
struct LayerDims {
  CellKind kind;
  int64_t G, H, P, I, B, N;
  bool projected;
};

// The dtype and device of an argument: the input's, or with float_ok also float32 for a bfloat16 input
// (the CPU kernels' biases and initial states under autocast: used in float32 anyway, and kept in
// float32 so that their gradients are not rounded to bfloat16).
inline void check_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& input,
                               bool float_ok) {
  const bool float_for_bf16 =
      float_ok && input.scalar_type() == at::kBFloat16 && t.scalar_type() == at::kFloat;
  TORCH_CHECK((t.scalar_type() == input.scalar_type() || float_for_bf16) && t.device() == input.device(),
              "seqfast: ", name, " must be ", input.scalar_type(), " on ", input.device(), ", got ",
              t.scalar_type(), " on ", t.device());
}

inline void check_vector(const OptTensor& t, const char* name, int64_t size, const at::Tensor& input,
                         bool float_ok = false) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, "seqfast: ", name, " must have shape (", size,
              "), got ", t->sizes());
  check_dtype_device(*t, name, input, float_ok);
}

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                  const at::Tensor& input, bool float_ok = false) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "seqfast: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  check_dtype_device(t, name, input, float_ok);
}

inline LayerDims check_layer(const at::Tensor& input, const Schedule& s, const at::Tensor& hx, const OptTensor& cx,
                      const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                      const OptTensor& b_hh, const OptTensor& w_hr, int64_t mode,
                      bool float_extras = false) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "seqfast: mode must be 0 (LSTM), 1 (GRU), 2 (RNN tanh) or 3 "
              "(RNN relu), got ", mode);
  LayerDims d;
  d.kind = static_cast<CellKind>(mode);
  d.G = gate_count(d.kind);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % d.G == 0 && w_ih.size(0) > 0,
              "seqfast: w_ih must be 2-D with a positive multiple of ", d.G, " rows, got ",
              w_ih.sizes());
  d.H = w_ih.size(0) / d.G;
  d.I = input.size(-1);
  d.projected = w_hr.has_value();
  TORCH_CHECK(!d.projected || d.kind == CellKind::LSTM, "seqfast: w_hr (projection) is LSTM-only");
  d.P = d.projected ? w_hr->size(0) : d.H;
  d.B = s.max_batch;
  d.N = s.tokens;
  check_matrix(w_ih, "w_ih", d.G * d.H, d.I, input);
  check_matrix(w_hh, "w_hh", d.G * d.H, d.P, input);
  if (d.projected) check_matrix(*w_hr, "w_hr", d.P, d.H, input);
  // float_extras: float32 biases, hx and cx are accepted for a bfloat16 input (the CPU kernels).
  check_vector(b_ih, "b_ih", d.G * d.H, input, float_extras);
  check_vector(b_hh, "b_hh", d.G * d.H, input, float_extras);
  check_matrix(hx, "hx", d.B, d.P, input, float_extras);
  if (d.kind == CellKind::LSTM) {
    TORCH_CHECK(cx.has_value(), "seqfast: LSTM needs cx");
    check_matrix(*cx, "cx", d.B, d.H, input, float_extras);
  } else {
    TORCH_CHECK(!cx.has_value(), "seqfast: cx is only for LSTM");
  }
  return d;
}

// The backward's own inputs, after check_layer: the gradients of output, hy and cy and the forward's
// output have the forward's shapes, the input's dtype and device (the kernels index them as such).
inline void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                  const OptTensor& grad_cy, const at::Tensor& output,
                                  const LayerDims& d, const at::Tensor& hx, const OptTensor& cx,
                                  const at::Tensor& input) {
  TORCH_CHECK(grad_output.numel() == d.N * d.P && output.numel() == d.N * d.P &&
                  grad_hy.sizes() == hx.sizes() &&
                  (!grad_cy.has_value() || (cx.has_value() && grad_cy->sizes() == cx->sizes())),
              "seqfast: recurrent_layer_backward: gradient shapes do not match the forward");
  for (const at::Tensor* t : {&grad_output, &output}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type() && t->device() == input.device(),
                "seqfast: recurrent_layer_backward: the gradients and the output must be ",
                input.scalar_type(), " on ", input.device(), ", got ", t->scalar_type(), " on ",
                t->device());
  }
  // grad_hy and grad_cy in hx's and cx's dtypes (which check_layer has checked).
  TORCH_CHECK(grad_hy.scalar_type() == hx.scalar_type() && grad_hy.device() == input.device(),
              "seqfast: recurrent_layer_backward: grad_hy must be ", hx.scalar_type(), " on ",
              input.device());
  if (grad_cy.has_value()) {
    TORCH_CHECK(grad_cy->scalar_type() == cx->scalar_type() && grad_cy->device() == input.device(),
                "seqfast: recurrent_layer_backward: grad_cy must be ", cx->scalar_type(), " on ",
                input.device());
  }
}

// The saved workspace must be what a training forward of this layer wrote.
inline void check_workspace(const at::Tensor& ws, const WorkspaceLayout& L, int64_t N,
                            const at::Tensor& input) {
  TORCH_CHECK(ws.numel() == N * L.columns,
              "seqfast: recurrent_layer_backward needs the workspace of a forward run with "
              "training=True (got ", ws.numel(), " elements, expected ", N * L.columns, ")");
  TORCH_CHECK(ws.scalar_type() == input.scalar_type() && ws.device() == input.device(),
              "seqfast: the workspace must be ", input.scalar_type(), " on ", input.device());
}

// ------------------------------------------------------------------------------------------------
// The workspace of one layer call seen through its WorkspaceLayout: the rows of a block (column
// offset `col`, width `width`) from token row `row`, as a pointer, or a whole block as an (N, width)
// matrix for the post-loop GEMMs.
struct WorkspaceView {
  at::Tensor data;        // flat, N * layout.columns elements (empty when the forward did not save)
  WorkspaceLayout layout;
  int64_t tokens;         // N

  template <typename T>
  T* rows(int64_t col, int64_t row, int64_t width) const {
    return data.data_ptr<T>() + layout.block(col, tokens) + row * width;
  }
  at::Tensor matrix(int64_t col, int64_t width) const {
    return data.narrow(0, layout.block(col, tokens), tokens * width).view({tokens, width});
  }
};

}  // namespace seqfast
