// CUDA backward of seqfast::recurrent_layer_forward: the reverse time loop (one fused pointwise kernel
// and one GEMM per step) and the deferred weight/input/bias gradients. Structure and dtype policy:
// recurrent_layer_cuda.h; the running state gradient is split in two (dh_state, dh_gemm), see
// recurrent_layer_pointwise.cuh.
//
// NOT YET RUN ON A GPU: compile-checked only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "recurrent_layer_cuda.h"
#include "recurrent_layer_pointwise.cuh"
#include "seqfast/recurrent.h"

namespace seqfast {
namespace cuda {
namespace {

using at::Tensor;

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad_output, const Tensor& grad_hy, const OptTensor& grad_cy, const Tensor& input,
    const Schedule& s, const LayerDims& d, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& output,
    const Tensor& ws, bool reverse, bool input_grad) {
  using A = at::opmath_type<T>;
  const int64_t N = s.tokens, H = d.H, P = d.P, GH = d.G * d.H, B = d.B;
  const auto opts = input.options();
  const auto acc_opts = acc_options<T>(input);
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const WorkspaceLayout L(d.kind, H, P, d.projected);
  check_workspace(ws, L, N, input);
  const WorkspaceView W{ws, L, N};

  const Tensor gout = grad_output.reshape({N, P}).contiguous();
  const Tensor out2d = output.reshape({N, P}).contiguous();
  Tensor dh_state = grad_hy.to(acc_opts, false, /*copy=*/true).contiguous();  // (B, P) in A
  Tensor dh_gemm = at::zeros({B, P}, acc_opts);                                // (B, P) in A
  Tensor dc_state = !is_lstm ? Tensor()
                    : (grad_cy.has_value() ? grad_cy->to(acc_opts, false, /*copy=*/true).contiguous()
                                           : at::zeros({B, H}, acc_opts));    // (B, H) in A
  // dgi: gradients of x W_ih^T + b_ih per token; dgh of h W_hh^T + b_hh (the same matrix but for GRU).
  Tensor dgi = at::empty({N, GH}, opts);
  Tensor dgh = is_gru ? at::empty({N, GH}, opts) : dgi;
  Tensor dh_proj = d.projected ? at::empty({N, P}, opts) : Tensor();        // dL/d(projected h)
  Tensor dh_unproj = d.projected ? at::empty({B, H}, acc_opts) : Tensor();  // per-step scratch

  for (int64_t step = s.steps() - 1; step >= 0; --step) {
    const int64_t t = reverse ? s.steps() - 1 - step : step;
    const int64_t bs = s.batch[t], row0 = s.offset[t];
    const T* gout_rows = gout.data_ptr<T>() + row0 * P;
    T* dgi_rows = dgi.data_ptr<T>() + row0 * GH;

    if (is_lstm) {
      LstmBackwardParams<T, A> p;
      p.rows = bs;
      p.H = H;
      p.act = W.rows<T>(L.act, row0, 4 * H);
      p.tanh_c = W.rows<T>(L.tanh_c, row0, H);
      p.c_prev = W.rows<T>(L.c_prev, row0, H);
      p.dc = dc_state.data_ptr<A>();
      p.dgates = dgi_rows;
      if (d.projected) {
        ProjectionGradParams<T, A> q;
        q.rows = bs;
        q.P = P;
        q.grad_out = gout_rows;
        q.dh_state = dh_state.data_ptr<A>();
        q.dh_gemm = dh_gemm.data_ptr<A>();
        q.dh_proj = dh_proj.data_ptr<T>() + row0 * P;
        projection_grad_pointwise<T, A>(q, stream);
        Tensor dh_unproj_rows = dh_unproj.narrow(0, 0, bs);
        mm_acc_out<T>(dh_unproj_rows, dh_proj.narrow(0, row0, bs), *w_hr);
        p.dh_unproj = dh_unproj.data_ptr<A>();
      } else {
        p.grad_out = gout_rows;
        p.dh_state = dh_state.data_ptr<A>();
        p.dh_gemm = dh_gemm.data_ptr<A>();
      }
      lstm_backward_pointwise<T, A>(p, stream);
    } else if (is_gru) {
      GruBackwardParams<T, A> p;
      p.rows = bs;
      p.H = H;
      p.act = W.rows<T>(L.act, row0, 3 * H);
      p.gh_n = W.rows<T>(L.gh_n, row0, H);
      p.h_prev = W.rows<T>(L.h_prev, row0, H);
      p.grad_out = gout_rows;
      p.dh_state = dh_state.data_ptr<A>();
      p.dh_gemm = dh_gemm.data_ptr<A>();
      p.dgi = dgi_rows;
      p.dgh = dgh.data_ptr<T>() + row0 * GH;
      gru_backward_pointwise<T, A>(p, stream);
    } else {
      RnnBackwardParams<T, A> p;
      p.rows = bs;
      p.H = H;
      p.h = out2d.data_ptr<T>() + row0 * P;
      p.grad_out = gout_rows;
      p.dh_state = dh_state.data_ptr<A>();
      p.dh_gemm = dh_gemm.data_ptr<A>();
      p.dpre = dgi_rows;
      if (d.kind == CellKind::RNN_RELU) {
        rnn_backward_pointwise<T, A, true>(p, stream);
      } else {
        rnn_backward_pointwise<T, A, false>(p, stream);
      }
    }
    // dL/dh_prev through W_hh for rows [0, bs); the next processed step (or grad_hx) adds it.
    Tensor dh_gemm_rows = dh_gemm.narrow(0, 0, bs);
    mm_acc_out<T>(dh_gemm_rows, dgh.narrow(0, row0, bs), w_hh);
  }

  // Every row was covered by the step with the full batch, so dh_state + dh_gemm is dL/dhx.
  Tensor grad_hx = dh_state.add_(dh_gemm).to(opts.dtype());
  Tensor grad_cx = is_lstm ? dc_state.to(opts.dtype()) : at::empty({0}, opts);

  // The weight, input and bias gradients: one GEMM / one reduction each, over all tokens.
  const Tensor x = input.reshape({N, d.I});
  Tensor grad_input = input_grad ? at::mm(dgi, w_ih).view(input.sizes()) : at::empty({0}, opts);
  Tensor grad_w_ih = at::mm(dgi.t(), x);
  Tensor grad_w_hh = at::mm(dgh.t(), W.matrix(L.h_prev, P));
  Tensor grad_b_ih = b_ih.has_value() ? dgi.sum(0) : at::empty({0}, opts);
  Tensor grad_b_hh = !b_hh.has_value() ? at::empty({0}, opts)
                     : (is_gru || !b_ih.has_value() ? dgh.sum(0) : grad_b_ih.clone());
  Tensor grad_w_hr = d.projected ? at::mm(dh_proj.t(), W.matrix(L.h_unproj, H)) : at::empty({0}, opts);
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
recurrent_layer_backward_cuda(const Tensor& grad_output, const Tensor& grad_hy,
                              const OptTensor& grad_cy, const Tensor& input,
                              const OptTensor& batch_sizes, const Tensor& hx, const OptTensor& cx,
                              const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                              const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& output,
                              const Tensor& workspace, int64_t mode, bool reverse,
                              bool input_grad) {
  check_cuda_dtype(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const Schedule s = make_schedule(input, batch_sizes);
  const LayerDims d = check_layer(input, s, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode);
  check_backward_inputs(grad_output, grad_hy, grad_cy, output, d, hx, cx, input);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                         "recurrent_layer_backward_cuda", [&] {
    return layer_backward<scalar_t>(grad_output, grad_hy, grad_cy, input, s, d, w_ih, w_hh, b_ih,
                                    b_hh, w_hr, output, workspace, reverse, input_grad);
  });
}

}  // namespace cuda
}  // namespace seqfast
