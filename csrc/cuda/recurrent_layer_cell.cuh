#pragma once
// The forward of one (batch row b, hidden unit j) of one time step, shared by the two CUDA forward
// paths: the per-step pointwise kernels (recurrent_layer_pointwise.cu, after a cuBLAS GEMM) and the
// persistent kernel (recurrent_layer_persistent.cu, which computes h W_hh^T itself). Both gather this
// element's h W_hh^T values from wherever they keep them and call these functions, so that the bias
// sums, the gate math (include/seqfast/gates.h) and the workspace stores exist once.
//
// The params structs are those of recurrent_layer_pointwise.cuh; these functions use only their
// step-row pointers (gx, biases, h_out and the workspace rows), never the state pointers (c,
// h_state), which the callers own: the pointwise kernels keep the state in global memory, the
// persistent kernel in registers. Sums are in the order ((x W_ih^T + b_ih) + h W_hh^T) + b_hh for
// every caller, so the two paths differ only in how h W_hh^T was summed.
//
// NOT YET RUN ON A GPU: compile-checked only.

#include <cstdint>

#include "recurrent_layer_pointwise.cuh"
#include "seqfast/gates.h"

namespace seqfast {
namespace cuda {

template <typename A, typename T>
__device__ __forceinline__ A load_bias(const T* p, int64_t k) {
  return p == nullptr ? A(0) : static_cast<A>(p[k]);
}

// gi[k] = m[b, k*H + j] + bias[k*H + j] for the G gates of (row b, unit j) of a (rows, G*H) matrix m
// (x W_ih^T with b_ih, or h W_hh^T with bias = nullptr). Separate from the element functions so that
// the persistent kernel can issue the x W_ih^T loads before it waits for h (they do not depend on it).
template <int G, typename A, typename T>
__device__ __forceinline__ void gates_of_row(const A* m, const T* bias, int64_t H, int64_t b, int64_t j,
                                             A (&gi)[G]) {
  const A* row = m + b * G * H;
#pragma unroll
  for (int k = 0; k < G; ++k) {
    gi[k] = row[k * H + j] + load_bias<A>(bias, k * H + j);
  }
}

// LSTM. gh: (h W_hh^T)[b, k*H + j] for i, f, g, o, without bias. c: the cell state, c_prev in, c'
// out. h_prev: the recurrent state before the step, saved when Save and p.h_prev is set (it is not
// when projecting). Stores h' to p.h_out and the workspace rows; returns h' in T.
template <typename T, typename A, bool Save>
__device__ __forceinline__ T lstm_forward_element(const LstmForwardParams<T, A>& p, int64_t b,
                                                  int64_t j, const A (&gi)[4], const A (&gh)[4], A& c,
                                                  T h_prev) {
  const int64_t H = p.H;
  A pre[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) pre[k] = gi[k] + gh[k] + load_bias<A>(p.b_hh, k * H + j);
  const A cp = c;
  A i, f, g, o, tc, h;
  lstm_pointwise_forward(pre[0], pre[1], pre[2], pre[3], cp, i, f, g, o, c, tc, h);
  const int64_t e = b * H + j;
  const T h_t = static_cast<T>(h);
  p.h_out[e] = h_t;
  if (Save) {
    T* act = p.act + b * 4 * H;
    act[j] = static_cast<T>(i);
    act[H + j] = static_cast<T>(f);
    act[2 * H + j] = static_cast<T>(g);
    act[3 * H + j] = static_cast<T>(o);
    p.tanh_c[e] = static_cast<T>(tc);
    p.c_prev[e] = static_cast<T>(cp);
    if (p.h_prev != nullptr) p.h_prev[e] = h_prev;
  }
  return h_t;
}

// GRU. gh: (h W_hh^T)[b, k*H + j] for r, z, n, without bias. h_prev: the state before the step.
template <typename T, typename A, bool Save>
__device__ __forceinline__ T gru_forward_element(const GruForwardParams<T, A>& p, int64_t b, int64_t j,
                                                 const A (&gi)[3], const A (&gh)[3], T h_prev) {
  const int64_t H = p.H;
  A ghb[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) ghb[k] = gh[k] + load_bias<A>(p.b_hh, k * H + j);
  A r, z, n, h;
  gru_pointwise_forward(gi[0], gi[1], gi[2], ghb[0], ghb[1], ghb[2], static_cast<A>(h_prev), r, z, n,
                        h);
  const int64_t e = b * H + j;
  const T h_t = static_cast<T>(h);
  p.h_out[e] = h_t;
  if (Save) {
    T* act = p.act + b * 3 * H;
    act[j] = static_cast<T>(r);
    act[H + j] = static_cast<T>(z);
    act[2 * H + j] = static_cast<T>(n);
    p.gh_n[e] = static_cast<T>(ghb[2]);
    p.h_prev[e] = h_prev;
  }
  return h_t;
}

// Elman RNN. gi: x W_ih^T + b_ih; gh: h W_hh^T, without bias.
template <typename T, typename A, bool Relu, bool Save>
__device__ __forceinline__ T rnn_forward_element(const RnnForwardParams<T, A>& p, int64_t b, int64_t j,
                                                 A gi, A gh, T h_prev) {
  constexpr Activation Act = Relu ? Activation::Relu : Activation::Tanh;
  const int64_t e = b * p.H + j;
  const T h_t = static_cast<T>(rnn_pointwise_forward<Act>(gi + gh + load_bias<A>(p.b_hh, j)));
  p.h_out[e] = h_t;
  if (Save) p.h_prev[e] = h_prev;
  return h_t;
}

}  // namespace cuda
}  // namespace seqfast
