// The per-step fused pointwise kernels of the CUDA recurrent layers (declared, with the shapes of every
// pointer, in recurrent_layer_pointwise.cuh). The math is include/seqfast/gates.h, the functions the CPU
// loop calls; this file only loads, converts to the compute type A, calls them and stores. The forward's
// per-element code is in recurrent_layer_cell.cuh, shared with the persistent kernel.
//
// NOT YET RUN ON A GPU: compile-checked only.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "recurrent_layer_cell.cuh"
#include "recurrent_layer_pointwise.cuh"
#include "seqfast/gates.h"

namespace seqfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Launch shape for n elements: one thread each, grid-stride loop beyond 2^20 blocks.
inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, int64_t(1) << 20));
}

template <typename A, typename T>
__device__ __forceinline__ A load(const T* p, int64_t k) {
  return static_cast<A>(p[k]);
}

#define SEQFAST_KERNEL_LOOP(idx, n)                                                     \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < (n); \
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x)

// ----------------------------------------------------------------------------------------------------
// Forward: gather this element's h W_hh^T values and state, then the shared per-element code
// (recurrent_layer_cell.cuh), which the persistent kernel calls too.
template <typename T, typename A, bool Save>
__global__ void __launch_bounds__(kThreads) lstm_forward_kernel(const LstmForwardParams<T, A> p) {
  const int64_t H = p.H;
  SEQFAST_KERNEL_LOOP(idx, p.rows * H) {
    const int64_t b = idx / H, j = idx - b * H;
    A gi[4], gh[4];
    gates_of_row<4>(p.gx, p.b_ih, H, b, j, gi);
    gates_of_row<4>(p.gh, static_cast<const T*>(nullptr), H, b, j, gh);
    const int64_t e = b * H + j;
    A c = p.c[e];
    const T h_prev = p.h_state != nullptr ? p.h_state[e] : T(0);
    const T h_t = lstm_forward_element<T, A, Save>(p, b, j, gi, gh, c, h_prev);
    p.c[e] = c;
    if (p.h_state != nullptr) p.h_state[e] = h_t;
  }
}

template <typename T, typename A, bool Save>
__global__ void __launch_bounds__(kThreads) gru_forward_kernel(const GruForwardParams<T, A> p) {
  const int64_t H = p.H;
  SEQFAST_KERNEL_LOOP(idx, p.rows * H) {
    const int64_t b = idx / H, j = idx - b * H;
    A gi[3], gh[3];
    gates_of_row<3>(p.gx, p.b_ih, H, b, j, gi);
    gates_of_row<3>(p.gh, static_cast<const T*>(nullptr), H, b, j, gh);
    const int64_t e = b * H + j;
    p.h_state[e] = gru_forward_element<T, A, Save>(p, b, j, gi, gh, p.h_state[e]);
  }
}

template <typename T, typename A, bool Relu, bool Save>
__global__ void __launch_bounds__(kThreads) rnn_forward_kernel(const RnnForwardParams<T, A> p) {
  const int64_t H = p.H;
  SEQFAST_KERNEL_LOOP(idx, p.rows * H) {
    const int64_t b = idx / H, j = idx - b * H;
    A gi[1];
    gates_of_row<1>(p.gx, p.b_ih, H, b, j, gi);
    const int64_t e = b * H + j;
    p.h_state[e] = rnn_forward_element<T, A, Relu, Save>(p, b, j, gi[0], p.gh[e], p.h_state[e]);
  }
}

// ----------------------------------------------------------------------------------------------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) lstm_backward_kernel(const LstmBackwardParams<T, A> p) {
  const int64_t H = p.H;
  SEQFAST_KERNEL_LOOP(idx, p.rows * H) {
    const int64_t b = idx / H, j = idx - b * H;
    const int64_t e = b * H + j;
    A dh;
    if (p.dh_unproj != nullptr) {
      dh = p.dh_unproj[e];
    } else {
      dh = p.dh_state[e] + p.dh_gemm[e] + load<A>(p.grad_out, e);
      p.dh_state[e] = A(0);
    }
    const T* act = p.act + b * 4 * H;
    A di, df, dg, dout, dcp;
    lstm_pointwise_backward(load<A>(act, j), load<A>(act, H + j), load<A>(act, 2 * H + j),
                            load<A>(act, 3 * H + j), load<A>(p.tanh_c, e), load<A>(p.c_prev, e), dh,
                            p.dc[e], di, df, dg, dout, dcp);
    T* dgates = p.dgates + b * 4 * H;
    dgates[j] = static_cast<T>(di);
    dgates[H + j] = static_cast<T>(df);
    dgates[2 * H + j] = static_cast<T>(dg);
    dgates[3 * H + j] = static_cast<T>(dout);
    p.dc[e] = dcp;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) projection_grad_kernel(const ProjectionGradParams<T, A> p) {
  SEQFAST_KERNEL_LOOP(e, p.rows * p.P) {
    p.dh_proj[e] = static_cast<T>(p.dh_state[e] + p.dh_gemm[e] + load<A>(p.grad_out, e));
    p.dh_state[e] = A(0);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) gru_backward_kernel(const GruBackwardParams<T, A> p) {
  const int64_t H = p.H;
  SEQFAST_KERNEL_LOOP(idx, p.rows * H) {
    const int64_t b = idx / H, j = idx - b * H;
    const int64_t e = b * H + j;
    const A dh = p.dh_state[e] + p.dh_gemm[e] + load<A>(p.grad_out, e);
    const T* act = p.act + b * 3 * H;
    A dr, dz, dn_i, dn_h, direct;
    gru_pointwise_backward(load<A>(act, j), load<A>(act, H + j), load<A>(act, 2 * H + j),
                           load<A>(p.gh_n, e), load<A>(p.h_prev, e), dh, dr, dz, dn_i, dn_h, direct);
    T* dgi = p.dgi + b * 3 * H;
    T* dgh = p.dgh + b * 3 * H;
    dgi[j] = static_cast<T>(dr);
    dgi[H + j] = static_cast<T>(dz);
    dgi[2 * H + j] = static_cast<T>(dn_i);
    dgh[j] = static_cast<T>(dr);
    dgh[H + j] = static_cast<T>(dz);
    dgh[2 * H + j] = static_cast<T>(dn_h);
    p.dh_state[e] = direct;
  }
}

template <typename T, typename A, bool Relu>
__global__ void __launch_bounds__(kThreads) rnn_backward_kernel(const RnnBackwardParams<T, A> p) {
  constexpr Activation Act = Relu ? Activation::Relu : Activation::Tanh;
  SEQFAST_KERNEL_LOOP(e, p.rows * p.H) {
    const A dh = p.dh_state[e] + p.dh_gemm[e] + load<A>(p.grad_out, e);
    p.dpre[e] = static_cast<T>(rnn_pointwise_backward<Act>(load<A>(p.h, e), dh));
    p.dh_state[e] = A(0);
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------------------
// Launchers. A step with no rows (cannot happen for a valid schedule) launches nothing.
#define SEQFAST_LAUNCH(kernel, n, stream, p)                        \
  do {                                                              \
    const int64_t n_ = (n);                                         \
    if (n_ == 0) return;                                            \
    kernel<<<blocks_for(n_), kThreads, 0, (stream)>>>(p);           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                 \
  } while (0)

template <typename T, typename A, bool Save>
void lstm_forward_pointwise(const LstmForwardParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((lstm_forward_kernel<T, A, Save>), p.rows * p.H, stream, p);
}
template <typename T, typename A, bool Save>
void gru_forward_pointwise(const GruForwardParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((gru_forward_kernel<T, A, Save>), p.rows * p.H, stream, p);
}
template <typename T, typename A, bool Relu, bool Save>
void rnn_forward_pointwise(const RnnForwardParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((rnn_forward_kernel<T, A, Relu, Save>), p.rows * p.H, stream, p);
}
template <typename T, typename A>
void lstm_backward_pointwise(const LstmBackwardParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((lstm_backward_kernel<T, A>), p.rows * p.H, stream, p);
}
template <typename T, typename A>
void projection_grad_pointwise(const ProjectionGradParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((projection_grad_kernel<T, A>), p.rows * p.P, stream, p);
}
template <typename T, typename A>
void gru_backward_pointwise(const GruBackwardParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((gru_backward_kernel<T, A>), p.rows * p.H, stream, p);
}
template <typename T, typename A, bool Relu>
void rnn_backward_pointwise(const RnnBackwardParams<T, A>& p, cudaStream_t stream) {
  SEQFAST_LAUNCH((rnn_backward_kernel<T, A, Relu>), p.rows * p.H, stream, p);
}

// Explicit instantiations: T in {double, float, Half, BFloat16}, A = at::opmath_type<T>.
#define SEQFAST_INSTANTIATE(T, A)                                                              \
  template void lstm_forward_pointwise<T, A, true>(const LstmForwardParams<T, A>&, cudaStream_t);  \
  template void lstm_forward_pointwise<T, A, false>(const LstmForwardParams<T, A>&, cudaStream_t); \
  template void gru_forward_pointwise<T, A, true>(const GruForwardParams<T, A>&, cudaStream_t);    \
  template void gru_forward_pointwise<T, A, false>(const GruForwardParams<T, A>&, cudaStream_t);   \
  template void rnn_forward_pointwise<T, A, false, true>(const RnnForwardParams<T, A>&, cudaStream_t);  \
  template void rnn_forward_pointwise<T, A, false, false>(const RnnForwardParams<T, A>&, cudaStream_t); \
  template void rnn_forward_pointwise<T, A, true, true>(const RnnForwardParams<T, A>&, cudaStream_t);   \
  template void rnn_forward_pointwise<T, A, true, false>(const RnnForwardParams<T, A>&, cudaStream_t);  \
  template void lstm_backward_pointwise<T, A>(const LstmBackwardParams<T, A>&, cudaStream_t);      \
  template void projection_grad_pointwise<T, A>(const ProjectionGradParams<T, A>&, cudaStream_t);  \
  template void gru_backward_pointwise<T, A>(const GruBackwardParams<T, A>&, cudaStream_t);        \
  template void rnn_backward_pointwise<T, A, false>(const RnnBackwardParams<T, A>&, cudaStream_t); \
  template void rnn_backward_pointwise<T, A, true>(const RnnBackwardParams<T, A>&, cudaStream_t);

SEQFAST_INSTANTIATE(double, double)
SEQFAST_INSTANTIATE(float, float)
SEQFAST_INSTANTIATE(c10::Half, float)
SEQFAST_INSTANTIATE(c10::BFloat16, float)

}  // namespace cuda
}  // namespace seqfast
