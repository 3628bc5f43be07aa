#pragma once
// The pointwise math of the recurrent cells: forward and backward of one hidden unit, written once and
// called by the CPU time loop (csrc/cpu) and the CUDA kernels (csrc/cuda) alike.
//
// Conventions (torch.nn's, see TORCH_RNN_FACTS.md):
//   LSTM gates i, f, g, o:  c' = f*c + i*g,  h' = o*tanh(c')
//   GRU gates r, z, n:      n = tanh(gi_n + r*(W_hn h + b_hn)),  h' = n + z*(h - n)
//   RNN:                    h' = tanh(pre) or relu(pre)
// Backward functions take the saved activations (post-nonlinearity), as haste does, so nothing is
// recomputed but tanh(c') where it was not saved.
//
// Every function is a template over the scalar type T (float or double). This header has no
// dependency on torch so it can be unit-tested on its own (tests/cpp).

#include <cstdint>
#include <cmath>

#include "seqfast/macros.h"

namespace seqfast {
namespace math {

SEQFAST_INLINE float int_bits_as_float(int32_t bits) {
#if SEQFAST_DEVICE_CODE
  return __int_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// e^x. On the host the float version is a branch-free Cody-Waite range reduction with the Cephes
// degree-6 polynomial (max error ~1 ulp on the clamped range), so that a loop calling it vectorizes
// (glibc's expf is a scalar call). Inputs are clamped to [-87, 88]: e^-87 is ~1.6e-38 and e^88 ~1.65e38,
// which is what sigmoid/tanh need (their results saturate long before the clamp matters).
SEQFAST_INLINE float exp(float x) {
#if SEQFAST_DEVICE_CODE
  return ::expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Adding and subtracting 1.5*2^23 rounds to the nearest integer without a libm call.
  const float round_shift = 12582912.0f;
  float k = (x * 1.44269504088896341f + round_shift) - round_shift;
  float r = x - k * 0.693359375f;   // ln 2, split in two so the reduction is exact
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * int_bits_as_float((static_cast<int32_t>(k) + 127) << 23);
#endif
}

SEQFAST_INLINE double exp(double x) { return ::exp(x); }

// 1 / d for the denominators of sigmoid and tanh, d = 1 + e^y in [1, 1.7e38]. On the host a division
// vectorizes to vdivps, whose throughput (one 16-float vector per ~10 cycles) made it the largest cost of
// the LSTM gate pass (36% of it, perf). Instead: the exponent-negating bit trick (relative error <= 12%)
// and three Newton steps r = r (2 - d r), each squaring the error (0.12 -> 1.4e-2 -> 2e-4 -> 4e-8): within
// ~2 ulp of the division, 6 multiply-adds, no branch. d is capped at 2^120 so the guess stays a normal
// float; the results it changes are below 1e-36 either way.
SEQFAST_INLINE float reciprocal(float d) {
#if SEQFAST_DEVICE_CODE
  return 1.0f / d;
#else
  d = d > 1.329228e36f ? 1.329228e36f : d;
  float r = int_bits_as_float(0x7EF311C3 - __builtin_bit_cast(int32_t, d));
  // Written r + r (1 - d r): the last step then lands on the correctly rounded value in the cases
  // that matter exactly (1 / 1 = 1, so tanh saturates to exactly +-1, as tanhf does).
  r = r + r * (1.0f - d * r);
  r = r + r * (1.0f - d * r);
  r = r + r * (1.0f - d * r);
  return r;
#endif
}

SEQFAST_INLINE double reciprocal(double d) { return 1.0 / d; }

SEQFAST_INLINE float tanh(float x) {
#if SEQFAST_DEVICE_CODE
  return ::tanhf(x);
#else
  // tanh(x) = 1 - 2/(e^{2x}+1) loses relative precision near 0; there an odd Taylor polynomial is exact
  // to float precision (|x| < 0.125: next term 62x^9/2835 < 1e-10). Both are computed, one is selected,
  // so the loop stays branch-free.
  float e = exp(2.0f * x);
  float large = 1.0f - 2.0f * reciprocal(e + 1.0f);
  float x2 = x * x;
  float small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  float ax = x < 0.0f ? -x : x;
  return ax < 0.125f ? small : large;
#endif
}

SEQFAST_INLINE double tanh(double x) { return ::tanh(x); }

template <typename T>
SEQFAST_INLINE T sigmoid(T x) {
  return reciprocal(T(1) + exp(-x));
}

}  // namespace math

// ---------------------------------------------------------------------------------------------------
// LSTM, one hidden unit.
// pre_*: gate pre-activations  x W_ih^T + b_ih + h W_hh^T + b_hh  for gates i, f, g, o.
template <typename T>
SEQFAST_INLINE void lstm_pointwise_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev,
                                           T& i, T& f, T& g, T& o, T& c, T& tanh_c, T& h) {
  i = math::sigmoid(pre_i);
  f = math::sigmoid(pre_f);
  g = math::tanh(pre_g);
  o = math::sigmoid(pre_o);
  c = f * c_prev + i * g;
  tanh_c = math::tanh(c);
  h = o * tanh_c;
}

// dh: gradient w.r.t. this step's (unprojected) h; dc_next: gradient w.r.t. c' arriving from step t+1
// (or from c_n). Outputs the gradients w.r.t. the four pre-activations and w.r.t. c_prev.
template <typename T>
SEQFAST_INLINE void lstm_pointwise_backward(T i, T f, T g, T o, T tanh_c, T c_prev, T dh, T dc_next,
                                            T& d_pre_i, T& d_pre_f, T& d_pre_g, T& d_pre_o,
                                            T& dc_prev) {
  const T one = T(1);
  T dc = dc_next + dh * o * (one - tanh_c * tanh_c);
  d_pre_i = dc * g * i * (one - i);
  d_pre_f = dc * c_prev * f * (one - f);
  d_pre_g = dc * i * (one - g * g);
  d_pre_o = dh * tanh_c * o * (one - o);
  dc_prev = dc * f;
}

// ---------------------------------------------------------------------------------------------------
// GRU, one hidden unit.
// gi_*: x W_ih^T + b_ih for r, z, n.  gh_*: h W_hh^T + b_hh for r, z, n (b_hn stays inside r*(...)).
template <typename T>
SEQFAST_INLINE void gru_pointwise_forward(T gi_r, T gi_z, T gi_n, T gh_r, T gh_z, T gh_n, T h_prev,
                                          T& r, T& z, T& n, T& h) {
  r = math::sigmoid(gi_r + gh_r);
  z = math::sigmoid(gi_z + gh_z);
  n = math::tanh(gi_n + r * gh_n);
  h = n + z * (h_prev - n);
}

// dh: gradient w.r.t. h'. The gradients of the r and z pre-activations are the same for the input
// and hidden projections (dgi_r, dgi_z); for n they differ: dgi_n for x W_in^T + b_in, dgh_n for
// h W_hn^T + b_hn. dh_prev_direct is the part of dL/dh that does not go through W_hh (h' = ... + z*h).
template <typename T>
SEQFAST_INLINE void gru_pointwise_backward(T r, T z, T n, T gh_n, T h_prev, T dh,
                                           T& dgi_r, T& dgi_z, T& dgi_n, T& dgh_n,
                                           T& dh_prev_direct) {
  const T one = T(1);
  T d_pre_n = dh * (one - z) * (one - n * n);
  dgi_n = d_pre_n;
  dgh_n = d_pre_n * r;
  dgi_r = d_pre_n * gh_n * r * (one - r);
  dgi_z = dh * (h_prev - n) * z * (one - z);
  dh_prev_direct = dh * z;
}

// ---------------------------------------------------------------------------------------------------
// Elman RNN, one hidden unit.
enum class Activation : int { Tanh, Relu };

template <Activation A, typename T>
SEQFAST_INLINE T rnn_pointwise_forward(T pre) {
  if (A == Activation::Tanh) return math::tanh(pre);
  return pre < T(0) ? T(0) : pre;  // NaN passes through, like torch.relu
}

// h: this step's output h'; dh: gradient w.r.t. h'. Returns the gradient w.r.t. the pre-activation.
template <Activation A, typename T>
SEQFAST_INLINE T rnn_pointwise_backward(T h, T dh) {
  if (A == Activation::Tanh) return dh * (T(1) - h * h);
  return h > T(0) ? dh : T(0);
}

}  // namespace seqfast
