// CPU kernel of seqfast::cell_forward: one step of a cell (the layer op at T = 1) without a graph.
//
// Why a kernel of its own: at B=1, H=16 the step's arithmetic is ~0.2 us, while the layer op's entry
// (schedule, a dozen ATen calls: linear, clones, empties, narrow, view, each with a dispatch and an
// allocation) costs ~5 us (benchmarks/NOTES.md 16). Here the only allocations are the returned states;
// the products are dot products along the rows of W as stored (dot_rows.h) and the gate math is the
// one copy in seqfast/gates.h. Anything beyond tiny sizes goes to the layer op, whose GEMMs win there.
// Gradients never come here: the op's autograd kernel (csrc/autograd.cpp) sends any call that needs
// a graph to recurrent_layer_forward, so there is one backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "dot_rows.h"
#include "multiversion.h"
#include "seqfast/gates.h"
#include "seqfast/op_handles.h"
#include "seqfast/recurrent.h"

namespace seqfast {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Multiply-adds of one step (B * G*H * (I + H)) up to which the dot-product path runs; B=1 H=64 is
// 32K. Above it the layer op's GEMMs are faster than row-by-row dot products.
constexpr int64_t kMaxCellMacs = int64_t(1) << 16;
// Gate rows (G*H) of the on-stack pre-activation buffers.
constexpr int64_t kMaxGateRows = 1024;

int64_t gates_of(int64_t mode) { return mode == 0 ? 4 : (mode == 1 ? 3 : 1); }

// Rows b of (B, I) input and (B, H) states: pre-activations into gi/gh (G*H each), then the gates.
template <typename T>
SEQFAST_CPU_MULTIVERSION void cell_rows(int64_t mode, int64_t B, int64_t I, int64_t H, const T* x,
                                        const T* h, const T* c, const T* w_ih, const T* w_hh,
                                        const T* b_ih, const T* b_hh, T* hy, T* cy) {
  const int64_t GH = gates_of(mode) * H;
  T gi[kMaxGateRows], gh[kMaxGateRows];
  for (int64_t b = 0; b < B; ++b) {
    const T* xb = x + b * I;
    const T* hb = h + b * H;
    dot_rows(xb, w_ih, GH, I, gi);
    dot_rows(hb, w_hh, GH, H, gh);
    for (int64_t j = 0; j < GH; ++j) {
      if (b_ih) gi[j] += b_ih[j];
      if (b_hh) gh[j] += b_hh[j];
    }
    T* out = hy + b * H;
    if (mode == 0) {
      const T* cb = c + b * H;
      T* cout = cy + b * H;
      for (int64_t j = 0; j < H; ++j) {
        T i, f, g, o, c_new, tanh_c, h_new;
        lstm_pointwise_forward(gi[j] + gh[j], gi[H + j] + gh[H + j], gi[2 * H + j] + gh[2 * H + j],
                               gi[3 * H + j] + gh[3 * H + j], cb[j], i, f, g, o, c_new, tanh_c, h_new);
        cout[j] = c_new;
        out[j] = h_new;
      }
    } else if (mode == 1) {
      for (int64_t j = 0; j < H; ++j) {
        T r, z, n, h_new;
        gru_pointwise_forward(gi[j], gi[H + j], gi[2 * H + j], gh[j], gh[H + j], gh[2 * H + j], hb[j], r,
                              z, n, h_new);
        out[j] = h_new;
      }
    } else if (mode == 2) {
      for (int64_t j = 0; j < H; ++j) out[j] = rnn_pointwise_forward<Activation::Tanh>(gi[j] + gh[j]);
    } else {
      for (int64_t j = 0; j < H; ++j) out[j] = rnn_pointwise_forward<Activation::Relu>(gi[j] + gh[j]);
    }
  }
}

bool same_layout(const Tensor& t, const Tensor& like) {
  return t.scalar_type() == like.scalar_type() && t.device() == like.device() && t.is_contiguous();
}

// input (B, I), hx (B, H), cx (B, H) for LSTM else None; w_ih (G*H, I), w_hh (G*H, H), biases (G*H) or
// None. Returns hy (B, H), cy (B, H) for LSTM else an empty tensor.
std::tuple<Tensor, Tensor> cell_forward_cpu(const Tensor& input, const Tensor& hx, const OptTensor& cx,
                                            const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                            const OptTensor& b_hh, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "seqfast.cell_forward: mode must be 0..3, got ", mode);
  TORCH_CHECK(input.dim() == 2 && hx.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2,
              "seqfast.cell_forward: expected 2-D input, hx, w_ih and w_hh");
  const int64_t B = input.size(0), I = input.size(1), H = hx.size(1), GH = gates_of(mode) * H;
  const bool is_lstm = mode == 0;
  TORCH_CHECK(is_lstm == cx.has_value(), "seqfast.cell_forward: cx must be given for LSTM only");
  const auto fits = [&](const OptTensor& t, int64_t rows, int64_t cols) {
    return !t.has_value() || (cols < 0 ? t->dim() == 1 && t->size(0) == rows
                                       : t->dim() == 2 && t->size(0) == rows && t->size(1) == cols);
  };
  const bool all_small = B * GH * (I + H) <= kMaxCellMacs && GH <= kMaxGateRows;
  const bool dense = same_layout(input, input) && same_layout(hx, input) && same_layout(w_ih, input) &&
                     same_layout(w_hh, input) && (!cx || same_layout(*cx, input)) &&
                     (!b_ih || same_layout(*b_ih, input)) && (!b_hh || same_layout(*b_hh, input)) &&
                     (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
  const bool shapes = hx.size(0) == B && w_ih.size(0) == GH && w_ih.size(1) == I && w_hh.size(0) == GH &&
                      w_hh.size(1) == H && fits(cx, B, H) && fits(b_ih, GH, -1) && fits(b_hh, GH, -1);
  if (!(all_small && dense && shapes)) {
    // The layer op checks every argument (with its own messages) and runs GEMMs for larger steps.
    return ops::cell_forward_by_layer_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode);
  }
  Tensor hy = at::empty({B, H}, input.options());
  Tensor cy = is_lstm ? at::empty({B, H}, input.options()) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cell_forward", [&] {
    const auto ptr = [](const OptTensor& t) { return t.has_value() ? t->data_ptr<scalar_t>() : nullptr; };
    cell_rows<scalar_t>(mode, B, I, H, input.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(), ptr(cx),
                        w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), ptr(b_ih), ptr(b_hh),
                        hy.data_ptr<scalar_t>(), is_lstm ? cy.data_ptr<scalar_t>() : nullptr);
  });
  return {hy, cy};
}

// ------------------------------------------------------------------------------------------------
// seqfast::cell_backward: recurrent_layer_backward for one unpacked step (T = 1, no projection, not
// reversed), from the layer op's saved workspace. The same gate math (gates.h backward functions);
// the products are row-by-row accumulations, which is all a tiny step needs.


// out (B, n) [+]= d (B, m) @ W (m, n).
template <typename T>
SEQFAST_CPU_INLINE void rows_times(const T* d, const T* W, int64_t B, int64_t m, int64_t n, T* out, bool add) {
  for (int64_t b = 0; b < B; ++b) {
    T* __restrict o = out + b * n;
    if (!add) std::fill(o, o + n, T(0));
    for (int64_t j = 0; j < m; ++j) {
      const T dj = d[b * m + j];
      const T* __restrict w = W + j * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) o[k] += dj * w[k];
    }
  }
}

// gW (m, n) = d^T (m, B) @ a (B, n); gb (m) = column sums of d (skipped when null).
template <typename T>
SEQFAST_CPU_INLINE void outer_sum(const T* d, const T* a, int64_t B, int64_t m, int64_t n, T* gW, T* gb) {
  std::fill(gW, gW + m * n, T(0));
  if (gb) std::fill(gb, gb + m, T(0));
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict ab = a + b * n;
    for (int64_t j = 0; j < m; ++j) {
      const T dj = d[b * m + j];
      T* __restrict g = gW + j * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) g[k] += dj * ab[k];
      if (gb) gb[j] += dj;
    }
  }
}

// dgi/dgh: (B, G*H) gradients of x W_ih^T + b_ih and of h W_hh^T + b_hh (the same for LSTM/RNN).
// dhx: (B, H), receives the part of dL/dh_prev that does not go through W_hh; dcx (B, H) for LSTM.
template <typename T>
SEQFAST_CPU_MULTIVERSION void cell_gate_grads(int64_t mode, int64_t B, int64_t H, const T* go, const T* ghy,
                                              const T* gcy, const T* ws, const T* out, T* dgi, T* dgh,
                                              T* dhx, T* dcx) {
  const int64_t GH = gates_of(mode) * H;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      const T dh = (go ? go[b * H + j] : T(0)) + (ghy ? ghy[b * H + j] : T(0));
      T* di = dgi + b * GH;
      if (mode == 0) {  // workspace blocks (B rows each): act 4H, tanh_c H, c_prev H, h_prev H
        const T* act = ws + b * 4 * H;
        const T tanh_c = ws[4 * H * B + b * H + j], c_prev = ws[5 * H * B + b * H + j];
        lstm_pointwise_backward(act[j], act[H + j], act[2 * H + j], act[3 * H + j], tanh_c, c_prev, dh,
                                gcy ? gcy[b * H + j] : T(0), di[j], di[H + j], di[2 * H + j],
                                di[3 * H + j], dcx[b * H + j]);
        dhx[b * H + j] = T(0);
      } else if (mode == 1) {  // act 3H, gh_n H, h_prev H
        const T* act = ws + b * 3 * H;
        const T gh_n = ws[3 * H * B + b * H + j], h_prev = ws[4 * H * B + b * H + j];
        T* dg = dgh + b * GH;
        gru_pointwise_backward(act[j], act[H + j], act[2 * H + j], gh_n, h_prev, dh, di[j], di[H + j],
                               di[2 * H + j], dg[2 * H + j], dhx[b * H + j]);
        dg[j] = di[j];
        dg[H + j] = di[H + j];
      } else {
        const T h = out[b * H + j];
        di[j] = mode == 2 ? rnn_pointwise_backward<Activation::Tanh>(h, dh)
                          : rnn_pointwise_backward<Activation::Relu>(h, dh);
        dhx[b * H + j] = T(0);
      }
    }
  }
}

template <typename T>
SEQFAST_CPU_MULTIVERSION void cell_backward_products(int64_t B, int64_t I, int64_t H, int64_t GH, const T* dgi,
                                                     const T* dgh, const T* x, const T* h_prev, const T* w_ih,
                                                     const T* w_hh, T* dx, T* dhx, T* gw_ih, T* gw_hh,
                                                     T* gb_ih, T* gb_hh) {
  rows_times(dgh, w_hh, B, GH, H, dhx, /*add=*/true);
  if (dx) rows_times(dgi, w_ih, B, GH, I, dx, /*add=*/false);
  outer_sum(dgi, x, B, GH, I, gw_ih, gb_ih);
  outer_sum(dgh, h_prev, B, GH, H, gw_hh, gb_hh);
}

// Arguments as recurrent_layer_backward's (batch_sizes, w_hr and reverse absent); grad_output and
// grad_hy may be None (no gradient reached them). input (1, B, I), output (1, B, H).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_backward_cpu(
    const OptTensor& grad_output_arg, const OptTensor& grad_hy_arg, const OptTensor& grad_cy_arg,
    const Tensor& input,
    const Tensor& hx, const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
    const OptTensor& b_hh, const Tensor& output, const Tensor& workspace, int64_t mode, bool input_grad) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "seqfast.cell_backward: mode must be 0..3, got ", mode);
  // Incoming gradients are often expanded (the backward of sum() is a stride-0 tensor): densify them,
  // B*H elements each.
  const auto dense_grad = [](const OptTensor& g) { return g.has_value() ? OptTensor(g->contiguous()) : g; };
  const OptTensor grad_output = dense_grad(grad_output_arg), grad_hy = dense_grad(grad_hy_arg),
                  grad_cy = dense_grad(grad_cy_arg);
  const bool is_lstm = mode == 0;
  const bool small = input.dim() == 3 && input.size(0) == 1 && hx.dim() == 2 && w_ih.dim() == 2 &&
                     w_hh.dim() == 2 && is_lstm == cx.has_value();
  const int64_t B = small ? input.size(1) : 0, I = small ? input.size(2) : 0, H = small ? hx.size(1) : 0;
  const int64_t GH = gates_of(mode) * H;
  const int64_t columns = mode == 0 ? 7 * H : (mode == 1 ? 5 * H : H);  // WorkspaceLayout, no projection
  const auto dense = [&](const OptTensor& t, std::initializer_list<int64_t> shape) {
    return !t.has_value() || (same_layout(*t, input) && t->sizes().equals(shape));
  };
  const bool fast = small && B * GH * (I + H) <= kMaxCellMacs && same_layout(input, input) &&
                    (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble) &&
                    dense(hx, {B, H}) && dense(cx, {B, H}) && dense(w_ih, {GH, I}) && dense(w_hh, {GH, H}) &&
                    dense(b_ih, {GH}) && dense(b_hh, {GH}) && dense(output, {1, B, H}) &&
                    dense(grad_output, {1, B, H}) && dense(grad_hy, {B, H}) && dense(grad_cy, {B, H}) &&
                    same_layout(workspace, input) && workspace.dim() == 1 && workspace.numel() == B * columns;
  if (!fast) {
    // The layer op checks every argument (with its own messages) and handles every size and layout.
    return ops::cell_backward_by_layer_op(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, b_ih,
                                          b_hh, output, workspace, mode, input_grad);
  }
  const auto opts = input.options();
  Tensor g_input = input_grad ? at::empty({1, B, I}, opts) : at::empty({0}, opts);
  Tensor g_hx = at::empty({B, H}, opts);
  Tensor g_cx = is_lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  Tensor g_w_ih = at::empty({GH, I}, opts), g_w_hh = at::empty({GH, H}, opts);
  Tensor g_b_ih = at::empty({b_ih ? GH : 0}, opts), g_b_hh = at::empty({b_hh ? GH : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cell_backward", [&] {
    using T = scalar_t;
    const auto ptr = [](const OptTensor& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; };
    std::vector<T> grads(mode == 1 ? 2 * B * GH : B * GH);
    T* dgi = grads.data();
    T* dgh = mode == 1 ? dgi + B * GH : dgi;
    const T* ws = workspace.data_ptr<T>();
    cell_gate_grads<T>(mode, B, H, ptr(grad_output), ptr(grad_hy), ptr(grad_cy), ws, output.data_ptr<T>(),
                       dgi, dgh, g_hx.data_ptr<T>(), is_lstm ? g_cx.data_ptr<T>() : nullptr);
    // h_prev: the workspace's last block (LSTM at 6H, GRU at 4H, RNN at 0 columns; B rows each).
    const T* h_prev = ws + (mode == 0 ? 6 * H : (mode == 1 ? 4 * H : 0)) * B;
    cell_backward_products<T>(B, I, H, GH, dgi, dgh, input.data_ptr<T>(), h_prev, w_ih.data_ptr<T>(),
                              w_hh.data_ptr<T>(), input_grad ? g_input.data_ptr<T>() : nullptr,
                              g_hx.data_ptr<T>(), g_w_ih.data_ptr<T>(), g_w_hh.data_ptr<T>(),
                              b_ih ? g_b_ih.data_ptr<T>() : nullptr, b_hh ? g_b_hh.data_ptr<T>() : nullptr);
  });
  return {g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh};
}

}  // namespace
}  // namespace cpu
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("cell_forward", &seqfast::cpu::cell_forward_cpu);
  m.impl("cell_backward", &seqfast::cpu::cell_backward_cpu);
}
