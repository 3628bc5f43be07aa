// CUDA kernels of seqfast::recurrent_layer_forward / recurrent_layer_backward: the forward time loop and
// the registration. Structure and dtype policy: recurrent_layer_cuda.h. The backward loop is in
// recurrent_layer_backward.cu, the pointwise kernels in recurrent_layer_pointwise.cu.
//
// NOT YET RUN ON A GPU: compile-checked only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "recurrent_layer_cuda.h"
#include "recurrent_layer_persistent.cuh"
#include "recurrent_layer_pointwise.cuh"
#include "seqfast/recurrent.h"

namespace seqfast {
namespace cuda {
namespace {

using at::Tensor;

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& input, const Schedule& s, const LayerDims& d, const Tensor& hx, const OptTensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, bool reverse, bool training) {
  using A = at::opmath_type<T>;
  const int64_t N = s.tokens, H = d.H, P = d.P, GH = d.G * d.H, B = d.B;
  const auto opts = input.options();
  const auto acc_opts = acc_options<T>(input);
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // (N, G*H) in A: the input projection of every step, without bias (the pointwise kernel adds it).
  Tensor gx = at::empty({N, GH}, acc_opts);
  mm_acc_out<T>(gx, input.reshape({N, d.I}), w_ih.t());
  Tensor gh = at::empty({B, GH}, acc_opts);  // per-step h W_hh^T, rows [0, batch[t])
  const Tensor bias_ih = b_ih.has_value() ? b_ih->contiguous() : Tensor();
  const Tensor bias_hh = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const Tensor w_hh_t = w_hh.t();

  Tensor output = at::empty({N, P}, opts);
  Tensor h_state = hx.clone(at::MemoryFormat::Contiguous);                      // (B, P) in T
  Tensor c_state = is_lstm ? cx->to(acc_opts, /*non_blocking=*/false, /*copy=*/true).contiguous()
                           : Tensor();                                          // (B, H) in A

  const WorkspaceLayout L(d.kind, H, P, d.projected);
  Tensor ws = at::empty({training ? N * L.columns : 0}, opts);
  const WorkspaceView W{ws, L, N};
  auto ws_ptr = [&](int64_t col, int64_t row, int64_t width) -> T* {  // null when nothing is saved
    return training ? W.rows<T>(col, row, width) : nullptr;
  };
  // Unprojected LSTM output when projecting: the saved rows when training, else a per-step scratch.
  Tensor h_unproj_scratch = d.projected && !training ? at::empty({B, H}, opts) : Tensor();

  for (int64_t step = 0; step < s.steps(); ++step) {
    const int64_t t = reverse ? s.steps() - 1 - step : step;
    const int64_t bs = s.batch[t], row0 = s.offset[t];
    const Tensor h_prev = h_state.narrow(0, 0, bs);
    if (d.projected && training) {
      W.matrix(L.h_prev, P).narrow(0, row0, bs).copy_(h_prev);
    }
    Tensor gh_rows = gh.narrow(0, 0, bs);
    mm_acc_out<T>(gh_rows, h_prev, w_hh_t);
    T* out_rows = output.data_ptr<T>() + row0 * P;
    // The fields every cell's step parameters share: this step's rows, the two GEMM results, biases.
    auto step_inputs = [&](auto& p) {
      p.rows = bs;
      p.H = H;
      p.gx = gx.data_ptr<A>() + row0 * GH;
      p.gh = gh.data_ptr<A>();
      p.b_ih = data_or_null<T>(bias_ih);
      p.b_hh = data_or_null<T>(bias_hh);
    };

    if (is_lstm) {
      LstmForwardParams<T, A> p;
      step_inputs(p);
      p.c = c_state.data_ptr<A>();
      p.h_out = !d.projected ? out_rows
                             : (training ? ws_ptr(L.h_unproj, row0, H) : h_unproj_scratch.data_ptr<T>());
      p.h_state = d.projected ? nullptr : h_state.data_ptr<T>();
      p.act = ws_ptr(L.act, row0, 4 * H);
      p.tanh_c = ws_ptr(L.tanh_c, row0, H);
      p.c_prev = ws_ptr(L.c_prev, row0, H);
      p.h_prev = d.projected ? nullptr : ws_ptr(L.h_prev, row0, P);
      if (training) {
        lstm_forward_pointwise<T, A, true>(p, stream);
      } else {
        lstm_forward_pointwise<T, A, false>(p, stream);
      }
      if (d.projected) {
        const Tensor h_unproj = training ? W.matrix(L.h_unproj, H).narrow(0, row0, bs)
                                         : h_unproj_scratch.narrow(0, 0, bs);
        Tensor out = output.narrow(0, row0, bs);
        at::mm_out(out, h_unproj, w_hr->t());
        // The projected h is the next step's state; rows >= bs keep h_n of the finished sequences.
        h_state.narrow(0, 0, bs).copy_(out);
      }
    } else if (is_gru) {
      GruForwardParams<T, A> p;
      step_inputs(p);
      p.h_state = h_state.data_ptr<T>();
      p.h_out = out_rows;
      p.act = ws_ptr(L.act, row0, 3 * H);
      p.gh_n = ws_ptr(L.gh_n, row0, H);
      p.h_prev = ws_ptr(L.h_prev, row0, H);
      if (training) {
        gru_forward_pointwise<T, A, true>(p, stream);
      } else {
        gru_forward_pointwise<T, A, false>(p, stream);
      }
    } else {
      RnnForwardParams<T, A> p;
      step_inputs(p);
      p.h_state = h_state.data_ptr<T>();
      p.h_out = out_rows;
      p.h_prev = ws_ptr(L.h_prev, row0, H);
      const bool relu = d.kind == CellKind::RNN_RELU;
      if (relu && training) rnn_forward_pointwise<T, A, true, true>(p, stream);
      if (relu && !training) rnn_forward_pointwise<T, A, true, false>(p, stream);
      if (!relu && training) rnn_forward_pointwise<T, A, false, true>(p, stream);
      if (!relu && !training) rnn_forward_pointwise<T, A, false, false>(p, stream);
    }
  }

  auto out_shape = input.sizes().vec();
  out_shape.back() = P;
  Tensor cy = is_lstm ? c_state.to(opts.dtype()) : at::empty({0}, opts);
  return {output.view(out_shape), h_state, cy, ws};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> recurrent_layer_forward_cuda(
    const Tensor& input, const OptTensor& batch_sizes, const Tensor& hx, const OptTensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, int64_t mode, bool reverse, bool training) {
  check_cuda_dtype(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const Schedule s = make_schedule(input, batch_sizes);
  const LayerDims d = check_layer(input, s, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode);
  // Small batch: one persistent kernel for all steps (recurrent_layer_persistent.cuh says when).
  if (const auto plan = plan_persistent_forward(input, d, training)) {
    return persistent_layer_forward(*plan, input, s, d, hx, cx, w_ih, w_hh, b_ih, b_hh, reverse,
                                    training);
  }
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                         "recurrent_layer_forward_cuda", [&] {
    return layer_forward<scalar_t>(input, s, d, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                   training);
  });
}

}  // namespace cuda
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CUDA, m) {
  m.impl("recurrent_layer_forward", &seqfast::cuda::recurrent_layer_forward_cuda);
  m.impl("recurrent_layer_backward", &seqfast::cuda::recurrent_layer_backward_cuda);
}
