// CPU kernel of seqfast::cell_forward: one step of a cell (the layer op at T = 1) without a graph.
//
// Why a kernel of its own: at B=1, H=16 the step's arithmetic is ~0.2 us, while the layer op's entry
// (schedule, a dozen ATen calls: linear, clones, empties, narrow, view, each with a dispatch and an
// allocation) costs ~5 us (benchmarks/NOTES.md 15). Here the only allocations are the returned states;
// the products are dot products along the rows of W as stored (dot_rows.h) and the gate math is the
// one copy in seqfast/gates.h. Anything beyond tiny sizes goes to the layer op, whose GEMMs win there.
// Gradients never come here: the op's autograd kernel (csrc/autograd.cpp) sends any call that needs
// a graph to recurrent_layer_forward, so there is one backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dot_rows.h"
#include "multiversion.h"
#include "seqfast/gates.h"
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

using LayerSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool, bool);

const c10::TypedOperatorHandle<LayerSignature>& layer_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seqfast::recurrent_layer_forward", "")
                             .typed<LayerSignature>();
  return op;
}

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
    const auto [output, hy, cy, workspace] =
        layer_op().call(input.unsqueeze(0), std::nullopt, hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt,
                        mode, /*reverse=*/false, /*training=*/false);
    return {hy, cy};
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

}  // namespace
}  // namespace cpu
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("cell_forward", &seqfast::cpu::cell_forward_cpu);
}
