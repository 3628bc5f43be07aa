// CPU kernels of seqfast::recurrent_layer_forward / recurrent_layer_backward: one layer, one direction,
// the whole time loop in C++.
//
// Forward:  gx = x W_ih^T + b_ih for all tokens (one GEMM); per step one GEMM h W_hh^T and ONE fused,
//           vectorized pass over the gates, parallel over the batch rows.
// Backward: reverse time loop with one fused pass and one GEMM (dh_prev = dG W_hh) per step; the
//           gradients of x, W_ih, W_hh and the biases are single GEMMs / reductions after the loop.
// Padded input is treated as packed input with every batch size equal to B, so there is one code path
// and packed sequences cost no work on padding: step t touches rows [0, batch[t]) only.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "buffers.h"
#include "multiversion.h"
#include "row_gemm.h"
#include "small_gemm.h"
#include "seqfast/gates.h"
#include "seqfast/recurrent.h"
#include "seqfast/recurrent_args.h"


namespace seqfast {
namespace cpu {
namespace {

using at::Tensor;

void check_cpu_dtype(const Tensor& input) {
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "seqfast: the fused CPU kernels support float32, float64 and bfloat16, got ", st);
}

// Rows per parallel chunk: at least at::internal::GRAIN_SIZE (32768) gate elements, torch's own
// threshold; below it a parallel region costs more than it saves (and stalls when cores are shared).
int64_t row_grain(const LayerDims& d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / (d.G * d.H)); }

template <typename T>
T* rows_of(const Tensor& t, int64_t row, int64_t width) {
  return t.data_ptr<T>() + row * width;
}

// ------------------------------------------------------------------------------------------------
// Storage type T and compute type A = at::opmath_type<T>: float for bfloat16, T itself for float and
// double. One loop for every dtype (ATen's convention): everything that is a GEMM operand, an output
// or saved for the backward is stored in T; the gate pre-activations, the LSTM cell state and the
// backward's running state gradients (dh, dc) are A, and every gate pass converts on the fly. For
// float/double the conversions are no-ops and the passes are the float32/float64 ones unchanged.
//
// Fused pointwise passes over rows [b0, b1) of one step. Every pointer is the step's row 0; row b of an
// (rows, w) matrix is at +b*w. `Save` selects whether the activations for the backward are stored.

template <typename T>
using acc_t = at::opmath_type<T>;

template <typename T>
struct LstmForwardStep {
  const acc_t<T>* gx;  // (bs, 4H) x W_ih^T + b_ih (compute type: the GEMMs return float for bf16)
  const acc_t<T>* gh;  // (bs, 4H) h_prev W_hh^T
  const acc_t<T>* b_hh;  // (4H) in the compute type
  acc_t<T>* c;       // (B, H) cell state, updated in place (compute type)
  T* h;              // (bs, H) o*tanh(c'): output rows, or the h_unproj rows when projecting
  T* act;            // (bs, 4H) saved i, f, g, o
  T* tanh_c;         // (bs, H) saved tanh(c')
  T* c_prev;         // (bs, H) saved c
};

// The per-row loops take __restrict pointer parameters (GCC ignores restrict on locals), so each
// inner loop vectorizes without alias checks.
template <typename T, bool Save, typename A = acc_t<T>>
SEQFAST_CPU_INLINE void lstm_forward_row(
    int64_t H, const A* __restrict gx, const A* __restrict gh, const A* __restrict bh,
    A* __restrict c, T* __restrict h, T* __restrict act, T* __restrict tanh_c, T* __restrict c_prev) {
  for (int64_t j = 0; j < H; ++j) {
    A i, f, g, o, c_new, tc, h_new;
    const A cp = c[j];
    lstm_pointwise_forward(A(gx[j]) + A(gh[j]) + A(bh[j]),
                           A(gx[H + j]) + A(gh[H + j]) + A(bh[H + j]),
                           A(gx[2 * H + j]) + A(gh[2 * H + j]) + A(bh[2 * H + j]),
                           A(gx[3 * H + j]) + A(gh[3 * H + j]) + A(bh[3 * H + j]), cp, i, f, g, o,
                           c_new, tc, h_new);
    c[j] = c_new;
    h[j] = T(h_new);
    if (Save) {
      act[j] = T(i);
      act[H + j] = T(f);
      act[2 * H + j] = T(g);
      act[3 * H + j] = T(o);
      tanh_c[j] = T(tc);
      c_prev[j] = T(cp);
    }
  }
}

// Small H. The per-row loops run H iterations, fewer than a vector holds when H < 16, so for the
// seed-stock LSTM (H = 10) the whole gate pass ran as scalar remainder loops: 59% of its forward
// (perf, benchmarks/NOTES.md 14); for 16 < H < 32 it is one vector and a long scalar remainder.
// Below kFlatMaxH (measured: faster up to H = 31, neutral to slower from H = 40) the passes instead
// stage the rows' gates gate-major (gate k of element e = b*H + j at k*n + e, n = rows*H: cheap adds
// and copies), run one
// flat vectorized loop over all n elements, and copy the saved gates back to the row layout. c, h,
// tanh_c, c_prev and dh are (rows, H) contiguous already, so they are used in place. The staging
// buffers hold the compute type.
constexpr int64_t kFlatMaxH = 32;

// Per-thread staging buffer for the flat passes (grows to the largest band seen, then is reused).
template <typename T>
T* flat_buffer(int64_t elements) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(elements);
  return buffer.data();
}

// dst[j] = D(src[j]) for j < m, where m is small (a row of H < kFlatMaxH units). A plain copy loop
// (S == D) is turned into a call to memcpy by the compiler, and for H = 10 the staging of the flat gate
// passes below made ~750 such 40-byte calls per step and band: the calls were 11% of a seed-stock GRU
// training step's calling thread (perf). Same types are copied instead with two overlapping moves of
// a fixed size, which the compiler emits inline; only rows above 128 bytes call memcpy.
template <typename S, typename D>
SEQFAST_CPU_INLINE void copy_short_row(const S* __restrict src, int64_t m, D* __restrict dst) {
  if constexpr (std::is_same_v<S, D>) {
    const size_t bytes = sizeof(S) * size_t(m);
    const char* s = reinterpret_cast<const char*>(src);
    char* d = reinterpret_cast<char*>(dst);
    auto two_moves = [&](auto chunk) {  // bytes in [chunk, 2 * chunk]
      constexpr size_t w = decltype(chunk)::value;
      std::memcpy(d, s, w);
      std::memcpy(d + bytes - w, s + bytes - w, w);
    };
    if (bytes > 128) std::memcpy(d, s, bytes);
    else if (bytes >= 64) two_moves(std::integral_constant<size_t, 64>());
    else if (bytes >= 32) two_moves(std::integral_constant<size_t, 32>());
    else if (bytes >= 16) two_moves(std::integral_constant<size_t, 16>());
    else if (bytes >= 8) two_moves(std::integral_constant<size_t, 8>());
    else if (bytes >= 4) two_moves(std::integral_constant<size_t, 4>());
    else if (bytes >= 2) two_moves(std::integral_constant<size_t, 2>());
    else if (bytes == 1) *d = *s;
  } else {
    for (int64_t j = 0; j < m; ++j) dst[j] = D(src[j]);
  }
}

// dst[k*n + b*H + j] = src[b*G*H + k*H + j] for gates k < G, rows b < rows, units j < H (converting).
template <int G, typename S, typename D>
SEQFAST_CPU_INLINE void to_gate_major(const S* __restrict src, int64_t rows, int64_t H, D* __restrict dst) {
  const int64_t n = rows * H;
  for (int64_t b = 0; b < rows; ++b) {
    for (int k = 0; k < G; ++k) {
      copy_short_row(src + b * G * H + k * H, H, dst + k * n + b * H);
    }
  }
}

template <int G, typename S, typename D>
SEQFAST_CPU_INLINE void from_gate_major(const S* __restrict src, int64_t rows, int64_t H, D* __restrict dst) {
  const int64_t n = rows * H;
  for (int64_t b = 0; b < rows; ++b) {
    for (int k = 0; k < G; ++k) {
      copy_short_row(src + k * n + b * H, H, dst + b * G * H + k * H);
    }
  }
}

// pre[k*n + b*H + j] = x[b*G*H + k*H + j] (+ y[same]) + bias[k*H + j]: the flat passes' gate-major
// sums of the rows' gate inputs. Written with local __restrict pointers: read through the step struct,
// the compiler assumed the staging stores could alias its fields and reloaded them for every element
// (perf annotate: a fifth of the seed-stock LSTM's training gate pass).
template <int G, typename A>
SEQFAST_CPU_INLINE void stage_gate_sums(const A* __restrict x, const A* __restrict y, const A* __restrict bias,
                                        int64_t rows, int64_t H, A* __restrict pre) {
  const int64_t n = rows * H;
  for (int64_t b = 0; b < rows; ++b) {
    for (int k = 0; k < G; ++k) {
      const A* __restrict xr = x + b * G * H + k * H;
      const A* __restrict bk = bias + k * H;
      A* __restrict dst = pre + k * n + b * H;
      if (y != nullptr) {
        const A* __restrict yr = y + b * G * H + k * H;
        for (int64_t j = 0; j < H; ++j) dst[j] = xr[j] + yr[j] + bk[j];
      } else {
        for (int64_t j = 0; j < H; ++j) dst[j] = xr[j] + bk[j];
      }
    }
  }
}

// pre and act: gate-major staging in the compute type A.
template <typename T, bool Save, typename A>
SEQFAST_CPU_INLINE void lstm_forward_flat(int64_t n, const A* __restrict pre, A* __restrict c,
                                          T* __restrict h, A* __restrict act, T* __restrict tanh_c,
                                          T* __restrict c_prev) {
  for (int64_t e = 0; e < n; ++e) {
    A i, f, g, o, c_new, tc, h_new;
    const A cp = c[e];
    lstm_pointwise_forward(pre[e], pre[n + e], pre[2 * n + e], pre[3 * n + e], cp, i, f, g, o, c_new,
                           tc, h_new);
    c[e] = c_new;
    h[e] = T(h_new);
    if (Save) {
      act[e] = i;
      act[n + e] = f;
      act[2 * n + e] = g;
      act[3 * n + e] = o;
      tanh_c[e] = T(tc);
      c_prev[e] = T(cp);
    }
  }
}

template <typename T, bool Save>
SEQFAST_CPU_MULTIVERSION void lstm_forward_rows(const LstmForwardStep<T>& p, int64_t H, int64_t b0,
                                                int64_t b1) {
  using A = acc_t<T>;
  if (H < kFlatMaxH) {
    const int64_t rows = b1 - b0, n = rows * H;
    A* pre = flat_buffer<A>((Save ? 8 : 4) * n);
    A* act = Save ? pre + 4 * n : nullptr;
    stage_gate_sums<4>(p.gx + b0 * 4 * H, p.gh + b0 * 4 * H, p.b_hh, rows, H, pre);
    lstm_forward_flat<T, Save>(n, pre, p.c + b0 * H, p.h + b0 * H, act,
                               Save ? p.tanh_c + b0 * H : nullptr, Save ? p.c_prev + b0 * H : nullptr);
    if (Save) from_gate_major<4>(act, rows, H, p.act + b0 * 4 * H);
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    lstm_forward_row<T, Save>(H, p.gx + b * 4 * H, p.gh + b * 4 * H, p.b_hh, p.c + b * H, p.h + b * H,
                              Save ? p.act + b * 4 * H : nullptr, Save ? p.tanh_c + b * H : nullptr,
                              Save ? p.c_prev + b * H : nullptr);
  }
}

template <typename T>
struct GruForwardStep {
  const acc_t<T>* gx;  // (bs, 3H) x W_ih^T + b_ih (compute type)
  const acc_t<T>* gh;  // (bs, 3H) h_prev W_hh^T (no bias)
  const acc_t<T>* b_hh;  // (3H) in the compute type
  const T* h_prev;  // (bs, H)
  T* h;             // (bs, H) output rows
  T* act;           // (bs, 3H) saved r, z, n
  T* gh_n;          // (bs, H) saved W_hn h + b_hn
};

template <typename T, bool Save, typename A = acc_t<T>>
SEQFAST_CPU_INLINE void gru_forward_row(
    int64_t H, const A* __restrict gx, const A* __restrict gh, const A* __restrict bh,
    const T* __restrict hp, T* __restrict h, T* __restrict act, T* __restrict ghn_saved) {
  for (int64_t j = 0; j < H; ++j) {
    A r, z, n, h_new;
    const A ghn = A(gh[2 * H + j]) + A(bh[2 * H + j]);
    gru_pointwise_forward(A(gx[j]), A(gx[H + j]), A(gx[2 * H + j]), A(gh[j]) + A(bh[j]),
                          A(gh[H + j]) + A(bh[H + j]), ghn, A(hp[j]), r, z, n, h_new);
    h[j] = T(h_new);
    if (Save) {
      act[j] = T(r);
      act[H + j] = T(z);
      act[2 * H + j] = T(n);
      ghn_saved[j] = T(ghn);
    }
  }
}

template <typename T, bool Save, typename A>
SEQFAST_CPU_INLINE void gru_forward_flat(int64_t n, const A* __restrict gi, const A* __restrict gh,
                                         const T* __restrict hp, T* __restrict h, A* __restrict act) {
  for (int64_t e = 0; e < n; ++e) {
    A r, z, c, h_new;
    gru_pointwise_forward(gi[e], gi[n + e], gi[2 * n + e], gh[e], gh[n + e], gh[2 * n + e], A(hp[e]), r,
                          z, c, h_new);
    h[e] = T(h_new);
    if (Save) {
      act[e] = r;
      act[n + e] = z;
      act[2 * n + e] = c;
    }
  }
}

template <typename T, bool Save>
SEQFAST_CPU_MULTIVERSION void gru_forward_rows(const GruForwardStep<T>& p, int64_t H, int64_t b0,
                                               int64_t b1) {
  using A = acc_t<T>;
  if (H < kFlatMaxH) {  // see lstm_forward_rows
    const int64_t rows = b1 - b0, n = rows * H;
    A* gi = flat_buffer<A>((Save ? 9 : 6) * n);
    A* gh = gi + 3 * n;  // h W_hh^T + b_hh, gate-major
    A* act = Save ? gi + 6 * n : nullptr;
    to_gate_major<3>(p.gx + b0 * 3 * H, rows, H, gi);
    stage_gate_sums<3>(p.gh + b0 * 3 * H, static_cast<const A*>(nullptr), p.b_hh, rows, H, gh);
    gru_forward_flat<T, Save>(n, gi, gh, p.h_prev + b0 * H, p.h + b0 * H, act);
    if (Save) {
      from_gate_major<3>(act, rows, H, p.act + b0 * 3 * H);
      T* __restrict ghn = p.gh_n + b0 * H;
      for (int64_t e = 0; e < n; ++e) ghn[e] = T(gh[2 * n + e]);
    }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    gru_forward_row<T, Save>(H, p.gx + b * 3 * H, p.gh + b * 3 * H, p.b_hh, p.h_prev + b * H,
                             p.h + b * H, Save ? p.act + b * 3 * H : nullptr,
                             Save ? p.gh_n + b * H : nullptr);
  }
}

template <typename T>
struct RnnForwardStep {
  const acc_t<T>* gx;  // (bs, H) (compute type)
  const acc_t<T>* gh;  // (bs, H)
  const acc_t<T>* b_hh;  // (H) in the compute type
  T* h;           // (bs, H) output rows
};

template <typename T, Activation A_, typename A = acc_t<T>>
SEQFAST_CPU_INLINE void rnn_forward_row(int64_t H, const A* __restrict gx, const A* __restrict gh,
                                        const A* __restrict bh, T* __restrict h) {
  for (int64_t j = 0; j < H; ++j) h[j] = T(rnn_pointwise_forward<A_>(A(gx[j]) + A(gh[j]) + A(bh[j])));
}

// h = act(pre), elementwise; pre in the compute type.
template <typename T, Activation A_, typename A>
SEQFAST_CPU_INLINE void rnn_activate_flat(int64_t n, const A* __restrict pre, T* __restrict h) {
  for (int64_t e = 0; e < n; ++e) h[e] = T(rnn_pointwise_forward<A_>(pre[e]));
}

template <typename T, Activation A_>
SEQFAST_CPU_INLINE void rnn_activate_in_place(int64_t n, T* __restrict h) {
  for (int64_t e = 0; e < n; ++e) h[e] = rnn_pointwise_forward<A_>(h[e]);
}

template <typename T, Activation A_>
SEQFAST_CPU_MULTIVERSION void rnn_forward_rows(const RnnForwardStep<T>& p, int64_t H, int64_t b0,
                                               int64_t b1) {
  using A = acc_t<T>;
  if (H < kFlatMaxH) {  // see lstm_forward_rows: rows are contiguous, only the bias needs j
    const int64_t n = (b1 - b0) * H;
    // float/double stage the pre-activations in the output rows themselves; bfloat16 in A.
    A* pre;
    if constexpr (std::is_same_v<T, A>) {
      pre = p.h + b0 * H;
    } else {
      pre = flat_buffer<A>(n);
    }
    for (int64_t e = 0, b = b0; b < b1; ++b) {
      const int64_t row = b * H;
      for (int64_t j = 0; j < H; ++j, ++e) pre[e] = A(p.gx[row + j]) + A(p.gh[row + j]) + A(p.b_hh[j]);
    }
    if constexpr (std::is_same_v<T, A>) {
      rnn_activate_in_place<T, A_>(n, pre);
    } else {
      rnn_activate_flat<T, A_>(n, pre, p.h + b0 * H);
    }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    rnn_forward_row<T, A_>(H, p.gx + b * H, p.gh + b * H, p.b_hh, p.h + b * H);
  }
}

// bfloat16: the bias gradients are sums over every token of the gate gradients, which the backward
// stores rounded to T (they are GEMM operands). Summing the rounded values cost up to ~3x torch's error
// on the bias gradients (tests/test_bf16.py), so the passes also add the unrounded gate gradients into
// per-batch-row accumulators (B, G*H) in the compute type: a row belongs to one thread in a step, so
// there are no races, and the rows are reduced once after the loop. float/double skip this.
template <typename T>
constexpr bool kBiasRows = !std::is_same_v<T, acc_t<T>>;

// out[i] = v in T, and bias_rows[i] += v for low-precision T.
template <typename T, typename A>
SEQFAST_CPU_INLINE void store_gate_grad(T* __restrict out, A* __restrict bias_rows, int64_t i, A v) {
  out[i] = T(v);
  if constexpr (kBiasRows<T>) bias_rows[i] += v;
}

// bias_rows[b*G*H + k*H + j] += src[k*n + b*H + j]: the flat passes' gate-major gradients.
template <int G, typename A>
SEQFAST_CPU_INLINE void add_gate_major(const A* __restrict src, int64_t rows, int64_t H, A* __restrict bias_rows) {
  const int64_t n = rows * H;
  for (int64_t b = 0; b < rows; ++b) {
    for (int k = 0; k < G; ++k) {
      for (int64_t j = 0; j < H; ++j) bias_rows[b * G * H + k * H + j] += src[k * n + b * H + j];
    }
  }
}

template <typename T>
struct LstmBackwardStep {
  const T* act;        // (bs, 4H)
  const T* tanh_c;     // (bs, H)
  const T* c_prev;     // (bs, H)
  const acc_t<T>* dh;  // (bs, H) gradient w.r.t. the step's unprojected h
  acc_t<T>* dc;        // (B, H) in: dL/dc' from step t+1; out: dL/dc_prev
  T* dgates;           // (bs, 4H) out: gradients of the pre-activations
  acc_t<T>* dbias;     // (bs, 4H) bias-gradient rows, added to (kBiasRows only)
};

// Units j < n of a row whose gates are S apart in act, dg and db (S = H; a unit slice passes n < S).
template <typename T, typename A = acc_t<T>>
SEQFAST_CPU_INLINE void lstm_backward_row(
    int64_t n, int64_t S, const T* __restrict act, const T* __restrict tc, const T* __restrict cp,
    const A* __restrict dh, A* __restrict dc, T* __restrict dg, A* __restrict db) {
  for (int64_t j = 0; j < n; ++j) {
    A di, df, dgg, dout, dcp;
    lstm_pointwise_backward(A(act[j]), A(act[S + j]), A(act[2 * S + j]), A(act[3 * S + j]), A(tc[j]),
                            A(cp[j]), dh[j], dc[j], di, df, dgg, dout, dcp);
    store_gate_grad(dg, db, j, di);
    store_gate_grad(dg, db, S + j, df);
    store_gate_grad(dg, db, 2 * S + j, dgg);
    store_gate_grad(dg, db, 3 * S + j, dout);
    dc[j] = dcp;
  }
}

template <typename T, typename A>
SEQFAST_CPU_INLINE void lstm_backward_flat(int64_t n, const A* __restrict act, const T* __restrict tc,
                                           const T* __restrict cp, const A* __restrict dh,
                                           A* __restrict dc, A* __restrict dg) {
  for (int64_t e = 0; e < n; ++e) {
    A di, df, dgg, dout, dcp;
    lstm_pointwise_backward(act[e], act[n + e], act[2 * n + e], act[3 * n + e], A(tc[e]), A(cp[e]),
                            dh[e], dc[e], di, df, dgg, dout, dcp);
    dg[e] = di;
    dg[n + e] = df;
    dg[2 * n + e] = dgg;
    dg[3 * n + e] = dout;
    dc[e] = dcp;
  }
}

template <typename T>
SEQFAST_CPU_MULTIVERSION void lstm_backward_rows(const LstmBackwardStep<T>& p, int64_t H, int64_t b0,
                                                 int64_t b1) {
  using A = acc_t<T>;
  if (H < kFlatMaxH) {  // see lstm_forward_rows
    const int64_t rows = b1 - b0, n = rows * H;
    A* act = flat_buffer<A>(8 * n);
    A* dg = act + 4 * n;
    to_gate_major<4>(p.act + b0 * 4 * H, rows, H, act);
    lstm_backward_flat<T>(n, act, p.tanh_c + b0 * H, p.c_prev + b0 * H, p.dh + b0 * H, p.dc + b0 * H, dg);
    from_gate_major<4>(dg, rows, H, p.dgates + b0 * 4 * H);
    if constexpr (kBiasRows<T>) add_gate_major<4>(dg, rows, H, p.dbias + b0 * 4 * H);
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    lstm_backward_row<T>(H, H, p.act + b * 4 * H, p.tanh_c + b * H, p.c_prev + b * H, p.dh + b * H,
                         p.dc + b * H, p.dgates + b * 4 * H, kBiasRows<T> ? p.dbias + b * 4 * H : nullptr);
  }
}

template <typename T>
struct GruBackwardStep {
  const T* act;        // (bs, 3H) r, z, n
  const T* gh_n;       // (bs, H)
  const T* h_prev;     // (bs, H)
  const acc_t<T>* dh;  // (bs, H)
  T* dgi;              // (bs, 3H) out: grads of x W_ih^T + b_ih
  T* dgh;              // (bs, 3H) out: grads of h W_hh^T + b_hh
  acc_t<T>* dh_prev;   // (B, H) out: the part of dL/dh_prev that bypasses W_hh
  acc_t<T>* dbias_i;   // (bs, 3H) bias-gradient rows of b_ih, added to (kBiasRows only)
  acc_t<T>* dbias_h;   // (bs, 3H) bias-gradient rows of b_hh, added to (kBiasRows only)
};

// Units j < n of a row whose gates are S apart (see lstm_backward_row).
template <typename T, typename A = acc_t<T>>
SEQFAST_CPU_INLINE void gru_backward_row(
    int64_t n, int64_t S, const T* __restrict act, const T* __restrict ghn, const T* __restrict hp,
    const A* __restrict dh, T* __restrict dgi, T* __restrict dgh, A* __restrict dhp, A* __restrict dbi,
    A* __restrict dbh) {
  for (int64_t j = 0; j < n; ++j) {
    A dr, dz, dn_i, dn_h, direct;
    gru_pointwise_backward(A(act[j]), A(act[S + j]), A(act[2 * S + j]), A(ghn[j]), A(hp[j]), dh[j], dr,
                           dz, dn_i, dn_h, direct);
    store_gate_grad(dgi, dbi, j, dr);
    store_gate_grad(dgi, dbi, S + j, dz);
    store_gate_grad(dgi, dbi, 2 * S + j, dn_i);
    store_gate_grad(dgh, dbh, j, dr);
    store_gate_grad(dgh, dbh, S + j, dz);
    store_gate_grad(dgh, dbh, 2 * S + j, dn_h);
    dhp[j] = direct;
  }
}

template <typename T, typename A>
SEQFAST_CPU_INLINE void gru_backward_flat(int64_t n, const A* __restrict act, const T* __restrict ghn,
                                          const T* __restrict hp, const A* __restrict dh,
                                          A* __restrict dgi, A* __restrict dgh, A* __restrict dhp) {
  for (int64_t e = 0; e < n; ++e) {
    A dr, dz, dn_i, dn_h, direct;
    gru_pointwise_backward(act[e], act[n + e], act[2 * n + e], A(ghn[e]), A(hp[e]), dh[e], dr, dz, dn_i,
                           dn_h, direct);
    dgi[e] = dr;
    dgi[n + e] = dz;
    dgi[2 * n + e] = dn_i;
    dgh[e] = dr;
    dgh[n + e] = dz;
    dgh[2 * n + e] = dn_h;
    dhp[e] = direct;
  }
}

template <typename T>
SEQFAST_CPU_MULTIVERSION void gru_backward_rows(const GruBackwardStep<T>& p, int64_t H, int64_t b0,
                                                int64_t b1) {
  using A = acc_t<T>;
  if (H < kFlatMaxH) {  // see lstm_forward_rows
    const int64_t rows = b1 - b0, n = rows * H;
    A* act = flat_buffer<A>(9 * n);
    A* dgi = act + 3 * n;
    A* dgh = act + 6 * n;
    to_gate_major<3>(p.act + b0 * 3 * H, rows, H, act);
    gru_backward_flat<T>(n, act, p.gh_n + b0 * H, p.h_prev + b0 * H, p.dh + b0 * H, dgi, dgh,
                         p.dh_prev + b0 * H);
    from_gate_major<3>(dgi, rows, H, p.dgi + b0 * 3 * H);
    from_gate_major<3>(dgh, rows, H, p.dgh + b0 * 3 * H);
    if constexpr (kBiasRows<T>) {
      add_gate_major<3>(dgi, rows, H, p.dbias_i + b0 * 3 * H);
      add_gate_major<3>(dgh, rows, H, p.dbias_h + b0 * 3 * H);
    }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    gru_backward_row<T>(H, H, p.act + b * 3 * H, p.gh_n + b * H, p.h_prev + b * H, p.dh + b * H,
                        p.dgi + b * 3 * H, p.dgh + b * 3 * H, p.dh_prev + b * H,
                        kBiasRows<T> ? p.dbias_i + b * 3 * H : nullptr,
                        kBiasRows<T> ? p.dbias_h + b * 3 * H : nullptr);
  }
}

template <typename T, Activation A_, typename A = acc_t<T>>
SEQFAST_CPU_INLINE void rnn_backward_row(int64_t H, const T* __restrict h, const A* __restrict dh,
                                         T* __restrict dpre, A* __restrict db) {
  for (int64_t j = 0; j < H; ++j) store_gate_grad(dpre, db, j, rnn_pointwise_backward<A_>(A(h[j]), dh[j]));
}

// dbias: (bs, H) bias-gradient rows (kBiasRows only).
template <typename T, Activation A_>
SEQFAST_CPU_MULTIVERSION void rnn_backward_rows(const T* h, const acc_t<T>* dh, T* dpre, acc_t<T>* dbias,
                                                int64_t H, int64_t b0, int64_t b1) {
  // The (rows, H) matrices are contiguous: one flat loop vectorizes whatever H is.
  rnn_backward_row<T, A_>((b1 - b0) * H, h + b0 * H, dh + b0 * H, dpre + b0 * H,
                          kBiasRows<T> ? dbias + b0 * H : nullptr);
}

template <typename F>
void parallel_rows(int64_t rows, int64_t grain, const F& f) {
  if (rows <= grain) {
    f(0, rows);
  } else {
    at::parallel_for(0, rows, grain, f);
  }
}

// The per-step products of the default loop on a band's rows. A small float32 weight runs the
// micro-kernel on raw row pointers (RowGemm::compute_rows); anything else goes through the Tensor API,
// whose views (a narrow of the state and one of the scratch or gradient rows, ~0.5-1 us each) were
// ~60 calls of a seed-stock training step.
//
// Forward: gh = h_prev @ W_hh^T for `rows` rows of h_state from row r0 (h_prev points there); the
// result is in the compute type, in gh_scratch or in a fresh tensor from oneDNN, which `holder` keeps
// for the gate pass.
template <typename T>
const acc_t<T>* recurrent_rows(RowGemm& gemm, int64_t rows, const T* h_prev, int64_t P, const Tensor& h_state,
                               int64_t r0, const Tensor& gh_scratch, Tensor& holder) {
  if constexpr (std::is_same_v<T, float>) {
    if (gemm.compute_rows(rows, h_prev, P, gh_scratch.data_ptr<float>(), gh_scratch.stride(0), false))
      return gh_scratch.data_ptr<float>();
  }
  holder = gemm.compute(h_state.narrow(0, r0, rows), gh_scratch);
  return holder.data_ptr<acc_t<T>>();
}

// Backward: dh_state[r0 : r0 + rows] (+)= g[row0 : row0 + rows] @ W_hh (gemm holds W_hh^T).
template <typename T>
void recurrent_rows_into(RowGemm& gemm, const Tensor& g, int64_t row0, int64_t rows, const Tensor& dh_state,
                         int64_t r0, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    float* out = dh_state.data_ptr<float>() + r0 * dh_state.stride(0);
    if (gemm.compute_rows(rows, g.data_ptr<float>() + row0 * g.stride(0), g.stride(0), out, dh_state.stride(0),
                          accumulate))
      return;
  }
  gemm.compute_into(g.narrow(0, row0, rows), dh_state.narrow(0, r0, rows), accumulate);
}

// ------------------------------------------------------------------------------------------------
// Row bands. The sequences of a layer are independent, so the time loop can run as independent loops
// over bands of batch rows, one band per thread, with no synchronization per step: each thread does
// its own per-step GEMM and gate pass for its rows. This parallelizes small layers, whose per-step
// GEMM is too small for BLAS to split and whose gate pass is below the parallel grain (they otherwise
// run the whole loop on one core), and it removes a fork/join per step. Large layers keep one band
// and parallelize inside each step's GEMM and gate pass instead (measured in benchmarks/NOTES.md).
// Bands are chosen so each holds about the same number of tokens (packed rows have different
// lengths; row b is active at the steps with batch[t] > b).
std::vector<int64_t> row_bands(const Schedule& s, const LayerDims& d) {
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = 4;
  // Multiply-adds of one step's recurrent GEMM: below this BLAS runs it on one core.
  const int64_t per_step_macs = s.max_batch * d.G * d.H * d.P;
  int64_t bands = std::min<int64_t>(threads, s.max_batch / min_rows);
  if (per_step_macs >= (int64_t(1) << 22) || at::in_parallel_region()) bands = 1;
  if (const char* forced = std::getenv("SEQFAST_ROW_BANDS")) bands = std::max<int64_t>(1, std::atoll(forced));
  bands = std::max<int64_t>(1, std::min(bands, s.max_batch));
  std::vector<int64_t> edges{0};
  if (bands > 1) {
    // length[b] = number of steps with batch[t] > b (rows are sorted by length, longest first).
    std::vector<int64_t> steps_with_batch(s.max_batch + 1, 0), length(s.max_batch + 1, 0);
    for (int64_t t = 0; t < s.steps(); ++t) steps_with_batch[s.batch[t]] += 1;
    for (int64_t b = s.max_batch - 1; b >= 0; --b) length[b] = length[b + 1] + steps_with_batch[b + 1];
    int64_t tokens_before = 0;
    for (int64_t b = 0; b + 1 < s.max_batch && int64_t(edges.size()) < bands; ++b) {
      tokens_before += length[b];
      if (tokens_before * bands >= s.tokens * int64_t(edges.size())) edges.push_back(b + 1);
    }
  }
  edges.push_back(s.max_batch);
  return edges;
}

template <typename F>
void for_each_band(const std::vector<int64_t>& edges, const F& f) {
  const int64_t bands = static_cast<int64_t>(edges.size()) - 1;
  if (bands == 1) {
    f(edges[0], edges[1]);
    return;
  }
  // Worker threads start with default thread-local state; the ATen calls in the loop must dispatch as
  // they do on this thread (below autograd: the weights may require grad).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, bands, 1, [&](int64_t k0, int64_t k1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t k = k0; k < k1; ++k) f(edges[k], edges[k + 1]);
  });
}

// ------------------------------------------------------------------------------------------------
// Unit split: the forward time loop of a large layer as ONE parallel region in which each thread owns
// a slice of the hidden units for the whole sequence (the column split of benchmarks/NOTES.md 18; what
// oneDNN's RNN primitive and onnxruntime's deep-CPU LSTM do). For its units, a thread computes the
// step's recurrent GEMM columns (every gate of those units: W_hh's rows permuted so that a slice's
// columns are contiguous), runs the gate pass on them and writes its columns of h and c; then one
// barrier per step, since the next step's GEMM reads every column of h. Against the default loop
// (each step's GEMM and gate pass parallelized separately) this removes two fork/joins per step, the
// per-step boxed oneDNN call and its fresh result tensor, and each thread's W_hh slice stays in its own
// core's cache from step to step. The input projection of all steps stays one GEMM before the loop, on
// W_ih's rows permuted the same way, so a slice's gate inputs are contiguous too.
//
// Used for the forward of unprojected layers whose per-step GEMM is large (the row bands of
// row_bands() serve the small ones), with an OpenMP torch (the barrier needs every chunk of a
// parallel_for running at once: OpenMP gives each team thread one chunk; a task pool may not).
// SEQFAST_UNIT_SPLIT=0 turns it off, =1 forces it (two slices whatever the size; the tests use this).

#if AT_PARALLEL_OPENMP
constexpr bool kUnitSplitBuild = true;
#else
constexpr bool kUnitSplitBuild = false;
#endif

// Slice edges over the hidden units (multiples of 16, one vector of floats), or {} for the default loop.
// The forward op's results from a loop's buffers: output (N, P) viewed in the input's shape with P
// last; hy and cy in hx's and cx's dtypes (float32 states of a bfloat16 layer under autocast come back
// float32; cy is never rounded to bfloat16: the cell state is float32 throughout). cx: LSTM only.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_results(const Tensor& input, const Tensor& output,
                                                           const Tensor& h_state, const Tensor& hx,
                                                           const Tensor& c_state, const OptTensor& cx,
                                                           const Tensor& ws) {
  auto sizes = input.sizes().vec();
  sizes.back() = output.size(1);
  return {output.view(sizes), h_state.to(hx.scalar_type()),
          c_state.to(cx.has_value() ? cx->scalar_type() : input.scalar_type()), ws};
}

// Rows of the input projection per chunk (see layer_forward_unit_split).
constexpr int64_t kChunkRows = 256;

std::vector<int64_t> unit_split_edges(const Schedule& s, const LayerDims& d, const Tensor& w_ih,
                                      const Tensor& w_hh, bool backward) {
  if (!kUnitSplitBuild || d.projected || d.H != d.P || s.steps() == 0 || at::in_parallel_region()) return {};
  const char* env = std::getenv("SEQFAST_UNIT_SPLIT");
  const bool forced = env != nullptr && std::strcmp(env, "1") == 0;
  if (env != nullptr && std::strcmp(env, "0") == 0) return {};
  // bfloat16 needs the float32-result micro-kernel for the slices' GEMMs (bf16_gemm.h: even I and H).
  if (w_hh.scalar_type() == at::kBFloat16 &&
      (!bf16_gemm_supports(w_hh, s.tokens) || !bf16_gemm_supports(w_ih, s.tokens))) {
    return {};
  }
  int64_t parts = 0, granule = 16;
  if (forced) {
    parts = std::min<int64_t>(2, d.H);
    granule = 1;
  } else {
    const int64_t per_step_macs = s.max_batch * d.G * d.H * d.P;
    if (per_step_macs < (int64_t(1) << 22)) return {};
    // The float32 backward at fewer than 8 rows (the micro-kernel's tile) keeps the default loop: each
    // step streams W_hh^T from L3 at the memory's pace, and the split was slower there (small-batch
    // T=64, B=4, I=H=1024 LSTM training: 1.08x the default loop's time; its forward: 0.95x, GRU 0.92x,
    // RNN 0.69x; bfloat16 halves the bytes and gains in both).
    if (backward && w_hh.scalar_type() != at::kBFloat16 && s.max_batch < 8) return {};
    // At least 32 units a slice, so each row's gate pass is two full vectors or more.
    parts = std::min<int64_t>(at::get_num_threads(), d.H / 32);
  }
  if (parts < 2) return {};
  const int64_t blocks = (d.H + granule - 1) / granule;
  std::vector<int64_t> edges;
  for (int64_t j = 0; j <= parts; ++j) edges.push_back(std::min(d.H, blocks * j / parts * granule));
  return edges;
}

// Waiting for the other slices at the end of a step. Each thread adds the slices it finished; all are
// done with step `step` when the count reaches parts * (step + 1). It spins ~20 us (a step's imbalance
// is usually shorter) and then yields the core, so that a busy machine's other processes are not starved
// by a waiting thread (NOTES 11).
class StepBarrier {
 public:
  // false: another thread failed (its exception reaches the caller through at::parallel_for).
  bool arrive_and_wait(int64_t done, int64_t target) {
    if (finished_.fetch_add(done, std::memory_order_acq_rel) + done >= target) return true;
    const auto start = std::chrono::steady_clock::now();
    bool spinning = true;
    for (int64_t k = 1;; ++k) {
      if (finished_.load(std::memory_order_acquire) >= target) return true;
      if (failed_.load(std::memory_order_relaxed)) return false;
      if (spinning) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (k % 64 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(20)) spinning = false;
      } else {
        std::this_thread::yield();
      }
    }
  }
  void fail() { failed_.store(true, std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> finished_{0};
  std::atomic<bool> failed_{false};
};

// The parallel region of the unit split: body(k0, k1, sync) runs slices [k0, k1) on one thread, with
// the caller's thread-local state (see for_each_band); sync(i) returns once every slice has passed its
// i-th sync, or false when another thread failed (the body then returns; that thread's exception
// reaches the caller through at::parallel_for).
template <typename F>
void run_unit_slices(int64_t parts, const F& body) {
  StepBarrier barrier;
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, parts, 1, [&](int64_t k0, int64_t k1) {
    at::ThreadLocalStateGuard guard(caller_state);
    try {
      body(k0, k1, [&](int64_t i) { return barrier.arrive_and_wait(k1 - k0, parts * (i + 1)); });
    } catch (...) {
      barrier.fail();
      throw;
    }
  });
}

// One slice's share of W_hh: c (rows, n) = a (rows, k) @ W_slice^T in the compute type. prepare() packs
// the weight on the thread that will use it (in parallel, into that core's cache). float32: W_slice^T in
// column panels for small_gemm.h's AVX-512 micro-kernel (at::mm_out, i.e. MKL, packs B on every call:
// 5% of an nmt-enc inference; ~120-130 GF/s for oneDNN's brgemm ukernel at 64x512x1024 on one core,
// ~158 for MKL); bfloat16: the float32-result micro-kernel of bf16_gemm.h; double (and CPUs without
// AVX-512): at::mm_out, single-threaded inside the parallel region.
template <typename T>
class SliceGemm {
 public:
  // Rows rows[0..n) of `weight` (k columns) form the slice's W; `rows` must outlive the object.
  SliceGemm(Tensor weight, const int64_t* rows, int64_t n)
      : full_(std::move(weight)), rows_(rows), n_(n), k_(full_.size(1)) {}

  void prepare() {
    if constexpr (std::is_same_v<T, float>) {
      if (small_gemm_available()) {  // packed straight from the full weight's rows: no gathered copy
        const Tensor w = full_.contiguous();
        panels_ = at::empty({weight_panels_size(n_, k_)}, w.options());
        pack_weight_panels(w.data_ptr<float>(), k_, rows_, n_, k_, panels_.data_ptr<float>());
        return;
      }
    }
    const Tensor index = at::from_blob(const_cast<int64_t*>(rows_), {n_}, at::TensorOptions().dtype(at::kLong));
    weight_ = full_.index_select(0, index);
    if constexpr (std::is_same_v<T, at::BFloat16>) bf16_.emplace(weight_);
  }

  // c (+)= a @ W_slice^T
  void run(int64_t rows, const T* a, int64_t lda, acc_t<T>* c, int64_t ldc, bool accumulate) const {
    if (rows <= 0) return;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      bf16_->run(rows, a, lda, c, ldc, accumulate);
      return;
    } else {
      if constexpr (std::is_same_v<T, float>) {
        if (panels_.defined()) {
          panel_gemm(rows, n_, k_, a, lda, panels_.data_ptr<float>(), c, ldc, accumulate);
          return;
        }
      }
      const auto opts = weight_.options();
      const Tensor a_t = at::from_blob(const_cast<T*>(a), {rows, k_}, {lda, 1}, opts);
      Tensor c_t = at::from_blob(c, {rows, n_}, {ldc, 1}, opts);
      if (accumulate) {
        c_t.addmm_(a_t, weight_.t());
      } else {
        at::mm_out(c_t, a_t, weight_.t());
      }
    }
  }

 private:
  Tensor full_;
  const int64_t* rows_;
  int64_t n_, k_;
  Tensor weight_;  // (n, k): the slice's rows, gathered (bfloat16 and the at::mm_out path)
  Tensor panels_;
  std::optional<Bf16Gemm> bf16_;
};

// A slice's gate pass over rows [0, rows) of one step. gx/gh/b_hh hold the slice's G*hj gate columns
// (gate k of unit j at k*hj + j); h, c and the saved (rows, H) blocks are the full-width rows, offset
// to the slice's first unit; act_scratch is (rows, G*hj), scattered to the workspace's (rows, G*H) act.
template <typename T>
struct SliceStep {
  const acc_t<T>* gx;  // row b at gx + b * gx_stride
  int64_t gx_stride;
  const acc_t<T>* gh;  // (rows, G*hj)
  const acc_t<T>* b_hh;
  const T* h_prev_carried;  // rows [0, carried): the previous step's output rows (stride H)
  const T* h_prev_initial;  // rows [carried, rows): h0's rows (stride H), indexed from row 0
  int64_t carried;
  acc_t<T>* c;   // LSTM: (B, H) cell state
  T* h;          // (rows, H) output rows
  T* act_scratch;
  T* act;        // (rows, G*H) workspace act, or nullptr
  T* tanh_c;     // LSTM (rows, H)
  T* c_prev;     // LSTM (rows, H)
  T* gh_n;       // GRU (rows, H)
  int64_t H, hj, u0;
};

template <int G, typename T>
SEQFAST_CPU_INLINE void scatter_act(const SliceStep<T>& p, int64_t b) {
  for (int k = 0; k < G; ++k) {
    std::memcpy(p.act + b * G * p.H + k * p.H + p.u0, p.act_scratch + b * G * p.hj + k * p.hj, sizeof(T) * p.hj);
  }
}

template <typename T, bool Save>
SEQFAST_CPU_MULTIVERSION void lstm_slice_rows(const SliceStep<T>& p, int64_t rows) {
  const int64_t H = p.H, hj = p.hj, u0 = p.u0;
  for (int64_t b = 0; b < rows; ++b) {
    lstm_forward_row<T, Save>(hj, p.gx + b * p.gx_stride, p.gh + b * 4 * hj, p.b_hh, p.c + b * H + u0,
                              p.h + b * H + u0, Save ? p.act_scratch + b * 4 * hj : nullptr,
                              Save ? p.tanh_c + b * H + u0 : nullptr, Save ? p.c_prev + b * H + u0 : nullptr);
    if (Save) scatter_act<4>(p, b);
  }
}

template <typename T, bool Save>
SEQFAST_CPU_MULTIVERSION void gru_slice_rows(const SliceStep<T>& p, int64_t rows) {
  const int64_t H = p.H, hj = p.hj, u0 = p.u0;
  for (int64_t b = 0; b < rows; ++b) {
    const T* hp = (b < p.carried ? p.h_prev_carried : p.h_prev_initial) + b * H + u0;
    gru_forward_row<T, Save>(hj, p.gx + b * p.gx_stride, p.gh + b * 3 * hj, p.b_hh, hp, p.h + b * H + u0,
                             Save ? p.act_scratch + b * 3 * hj : nullptr, Save ? p.gh_n + b * H + u0 : nullptr);
    if (Save) scatter_act<3>(p, b);
  }
}

template <typename T, Activation A_>
SEQFAST_CPU_MULTIVERSION void rnn_slice_rows(const SliceStep<T>& p, int64_t rows) {
  for (int64_t b = 0; b < rows; ++b) {
    rnn_forward_row<T, A_>(p.hj, p.gx + b * p.gx_stride, p.gh + b * p.hj, p.b_hh, p.h + b * p.H + p.u0);
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward_unit_split(
    const Tensor& input, const Schedule& s, const LayerDims& d, const Tensor& hx, const OptTensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool reverse,
    bool training, const std::vector<int64_t>& edges) {
  using A = acc_t<T>;
  const int64_t N = s.tokens, H = d.H, G = d.G, GH = d.G * d.H, B = d.B;
  const int64_t parts = static_cast<int64_t>(edges.size()) - 1;
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<A>::value);
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;

  // Slice j's columns: gate 0 of its units, gate 1 of its units, ... (torch's gate order within).
  std::vector<int64_t> order;
  order.reserve(GH);
  for (int64_t j = 0; j < parts; ++j) {
    for (int64_t k = 0; k < G; ++k) {
      for (int64_t u = edges[j]; u < edges[j + 1]; ++u) order.push_back(k * H + u);
    }
  }
  const Tensor index = at::tensor(order, at::TensorOptions().dtype(at::kLong));
  const Tensor x = input.reshape({N, d.I}).contiguous();
  // b_ih: added into the projection (GRU: its n gate needs b_in apart from b_hn) or, for LSTM/RNN,
  // folded into the one bias the gate pass adds (which spares filling each chunk with it first).
  Tensor bias_ih =
      b_ih.has_value() ? b_ih->to(acc_opts.dtype()).index_select(0, index).contiguous() : Tensor();
  Tensor bias_hh = (b_hh.has_value() ? b_hh->to(acc_opts.dtype()) : at::zeros({GH}, acc_opts))
                       .index_select(0, index).contiguous();
  if (!is_gru && bias_ih.defined()) {
    bias_hh.add_(bias_ih);
    bias_ih = Tensor();
  }

  Tensor output = empty_buffer({N, H}, opts);
  const Tensor h0 = hx.to(opts, /*non_blocking=*/false, /*copy=*/true).contiguous();
  Tensor c_state = is_lstm ? cx->to(acc_opts, /*non_blocking=*/false, /*copy=*/true).contiguous()
                           : at::empty({0}, acc_opts);
  const WorkspaceLayout L(d.kind, H, H, /*projected=*/false);
  Tensor ws = empty_buffer({training ? N * L.columns : 0}, opts);
  const WorkspaceView W{ws, L, N};

  // The input projection x W_ih^T + b_ih is computed per chunk of steps, each thread for its slice's
  // columns, into a buffer reused from chunk to chunk: ~512 rows keep its GEMM efficient, and the
  // projection of all steps (52 MB of float32 at T=100, B=64, H=512) is never materialized. That
  // buffer's page faults and its round trip through memory were ~9% and most of the gate pass's ~26% of
  // a bf16 canonical LSTM inference with it (perf).
  const int64_t chunk_steps = std::max<int64_t>(1, kChunkRows / s.max_batch);
  std::vector<SliceGemm<T>> gemms, input_gemms;
  std::vector<Tensor> gh_scratch, gx_chunk, act_scratch;
  for (int64_t j = 0; j < parts; ++j) {
    const int64_t hj = edges[j + 1] - edges[j];
    gemms.emplace_back(w_hh, order.data() + G * edges[j], G * hj);
    input_gemms.emplace_back(w_ih, order.data() + G * edges[j], G * hj);
    gh_scratch.push_back(at::empty({s.max_batch, G * hj}, acc_opts));
    gx_chunk.push_back(at::empty({chunk_steps * s.max_batch, G * hj}, acc_opts));
    act_scratch.push_back(at::empty({training && G > 1 ? s.max_batch * G * hj : 0}, opts));
  }

  const T* out_data = output.data_ptr<T>();
  run_unit_slices(parts, [&](int64_t k0, int64_t k1, const auto& sync) {
      for (int64_t j = k0; j < k1; ++j) {
        gemms[j].prepare();
        input_gemms[j].prepare();
      }
      int64_t chunk_row0 = 0;
      for (int64_t step = 0; step < s.steps(); ++step) {
        const int64_t t = reverse ? s.steps() - 1 - step : step;
        const int64_t rows = s.batch[t], row0 = s.offset[t];
        if (step % chunk_steps == 0) {  // the input projection of this chunk's tokens (contiguous rows)
          const int64_t last = std::min(step + chunk_steps, s.steps()) - 1;
          const int64_t t_last = reverse ? s.steps() - 1 - last : last;
          const int64_t t_lo = std::min(t, t_last), t_hi = std::max(t, t_last);
          chunk_row0 = s.offset[t_lo];
          const int64_t chunk_rows = s.offset[t_hi] + s.batch[t_hi] - chunk_row0;
          for (int64_t j = k0; j < k1; ++j) {
            const int64_t width = G * (edges[j + 1] - edges[j]);
            A* gxj = gx_chunk[j].data_ptr<A>();
            if (bias_ih.defined()) {
              const A* bias = bias_ih.data_ptr<A>() + G * edges[j];
              for (int64_t r = 0; r < chunk_rows; ++r) std::memcpy(gxj + r * width, bias, sizeof(A) * width);
            }
            input_gemms[j].run(chunk_rows, x.data_ptr<T>() + chunk_row0 * d.I, d.I, gxj, width,
                               /*accumulate=*/bias_ih.defined());
          }
        }
        // h_prev: rows the previous step computed come from its output rows; the others (all at the
        // first step; for the reverse direction of a packed batch, the sequences that start here) from h0.
        const int64_t t_prev = reverse ? t + 1 : t - 1;
        const int64_t carried = step == 0 ? 0 : std::min(rows, s.batch[t_prev]);
        const T* prev = step == 0 ? nullptr : out_data + s.offset[t_prev] * H;
        for (int64_t j = k0; j < k1; ++j) {
          const int64_t u0 = edges[j], hj = edges[j + 1] - u0;
          A* gh = gh_scratch[j].data_ptr<A>();
          gemms[j].run(carried, prev, H, gh, G * hj, /*accumulate=*/false);
          gemms[j].run(rows - carried, h0.data_ptr<T>() + carried * H, H, gh + carried * G * hj, G * hj,
                       /*accumulate=*/false);
          if (training) {  // this slice's columns of h_prev, for the backward
            T* saved = W.rows<T>(L.h_prev, row0, H);
            for (int64_t b = 0; b < rows; ++b) {
              const T* src = (b < carried ? prev : h0.data_ptr<T>()) + b * H + u0;
              std::memcpy(saved + b * H + u0, src, sizeof(T) * hj);
            }
          }
          SliceStep<T> p{};
          p.gx = gx_chunk[j].data_ptr<A>() + (row0 - chunk_row0) * G * hj;
          p.gx_stride = G * hj;
          p.gh = gh;
          p.b_hh = bias_hh.data_ptr<A>() + G * u0;
          p.h_prev_carried = prev;
          p.h_prev_initial = h0.data_ptr<T>();
          p.carried = carried;
          p.h = output.data_ptr<T>() + row0 * H;
          p.H = H;
          p.hj = hj;
          p.u0 = u0;
          if (training) {
            p.act_scratch = act_scratch[j].data_ptr<T>();
            p.act = G > 1 ? W.rows<T>(L.act, row0, G * H) : nullptr;
          }
          if (is_lstm) {
            p.c = c_state.data_ptr<A>();
            if (training) {
              p.tanh_c = W.rows<T>(L.tanh_c, row0, H);
              p.c_prev = W.rows<T>(L.c_prev, row0, H);
              lstm_slice_rows<T, true>(p, rows);
            } else {
              lstm_slice_rows<T, false>(p, rows);
            }
          } else if (is_gru) {
            if (training) {
              p.gh_n = W.rows<T>(L.gh_n, row0, H);
              gru_slice_rows<T, true>(p, rows);
            } else {
              gru_slice_rows<T, false>(p, rows);
            }
          } else if (d.kind == CellKind::RNN_TANH) {
            rnn_slice_rows<T, Activation::Tanh>(p, rows);
          } else {
            rnn_slice_rows<T, Activation::Relu>(p, rows);
          }
        }
        if (!sync(step)) return;
      }
  });

  // h_n: each sequence's last output row (forward: its last step; reverse: step 0, where all are active).
  Tensor h_state = h0;
  for (int64_t b = 0; b < s.max_batch; ++b) {
    int64_t t_last = 0;
    if (!reverse) {
      while (t_last + 1 < s.steps() && s.batch[t_last + 1] > b) ++t_last;
    }
    std::memcpy(h_state.data_ptr<T>() + b * H, out_data + (s.offset[t_last] + b) * H, sizeof(T) * H);
  }

  return forward_results(input, output, h_state, hx, c_state, is_lstm ? cx : OptTensor(), ws);
}

// ------------------------------------------------------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& input, const Schedule& s, const LayerDims& d, const Tensor& hx, const OptTensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, bool reverse, bool training) {
  using A = acc_t<T>;
  const int64_t N = s.tokens, H = d.H, P = d.P, GH = d.G * d.H, B = d.B;
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<A>::value);
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;
  if (const auto edges = unit_split_edges(s, d, w_ih, w_hh, /*backward=*/false); !edges.empty()) {
    return layer_forward_unit_split<T>(input, s, d, hx, cx, w_ih, w_hh, b_ih, b_hh, reverse, training, edges);
  }

  const Tensor x = input.reshape({N, d.I});
  // LSTM/RNN: b_ih is folded into the one bias the gate pass adds (b_ih + b_hh), so the projection is a
  // plain product (at::addmm first fills its result with the broadcast bias: ~4% of a small LSTM's
  // inference, perf). GRU's n gate needs b_in apart from b_hn: its projection adds b_ih.
  const bool fold_b_ih = !is_gru && b_ih.has_value();
  // (N, G*H) in A: every step's x W_ih^T (+ b_ih for GRU)
  const Tensor gx = cpu::input_projection(x, w_ih, fold_b_ih ? OptTensor() : b_ih);
  Tensor bias_hh = b_hh.has_value() ? b_hh->to(acc_opts.dtype()).contiguous() : at::zeros({GH}, acc_opts);
  if (fold_b_ih) bias_hh = bias_hh + b_ih->to(acc_opts.dtype());

  Tensor output = empty_buffer({N, P}, opts);
  // The recurrent state is the next step's GEMM operand: in T (hx may be float32 for bfloat16, autocast).
  Tensor h_state = hx.to(opts, /*non_blocking=*/false, /*copy=*/true).contiguous();
  // The cell state in the compute type (float for bfloat16) for the whole loop; rounded to T once, at
  // the end.
  Tensor c_state = is_lstm ? cx->to(acc_opts, /*non_blocking=*/false, /*copy=*/true).contiguous()
                           : at::empty({0}, acc_opts);

  const WorkspaceLayout L(d.kind, H, P, d.projected);
  Tensor ws = empty_buffer({training ? N * L.columns : 0}, opts);
  const WorkspaceView W{ws, L, N};
  RowGemm recurrent(w_hh, B, N);
  std::optional<RowGemm> projection;
  if (d.projected) projection.emplace(*w_hr, B, N);
  const int64_t grain = row_grain(d);

  // The time loop over batch rows [r0, r1) (a band; see row_bands).
  auto run_band = [&](int64_t r0, int64_t r1) {
    if (r1 <= r0) return;
    Tensor gh_scratch = at::empty({r1 - r0, GH}, acc_opts);
    // Unprojected LSTM output when projecting: saved rows when training, else a per-step scratch.
    Tensor h_unproj_scratch = d.projected && !training ? at::empty({r1 - r0, H}, opts) : Tensor();
    for (int64_t step = 0; step < s.steps(); ++step) {
      const int64_t t = reverse ? s.steps() - 1 - step : step;
      const int64_t rows = std::min(s.batch[t], r1) - r0;  // active rows of this band at step t
      if (rows <= 0) continue;
      const int64_t row0 = s.offset[t] + r0;  // token row of the band's first row
      T* const h_prev = h_state.data_ptr<T>() + r0 * P;
      if (training) {
        std::memcpy(W.rows<T>(L.h_prev, row0, P), h_prev, sizeof(T) * rows * P);
      }
      Tensor gh_holder;
      const A* gh_rows = recurrent_rows(recurrent, rows, h_prev, P, h_state, r0, gh_scratch, gh_holder);
      const A* gx_rows = rows_of<A>(gx, row0, GH);
      T* out_rows = rows_of<T>(output, row0, P);

      if (is_lstm) {
        LstmForwardStep<T> p;
        p.gx = gx_rows;
        p.gh = gh_rows;
        p.b_hh = bias_hh.data_ptr<A>();
        p.c = c_state.data_ptr<A>() + r0 * H;
        p.h = !d.projected ? out_rows
                           : (training ? W.rows<T>(L.h_unproj, row0, H) : h_unproj_scratch.data_ptr<T>());
        if (training) {
          p.act = W.rows<T>(L.act, row0, 4 * H);
          p.tanh_c = W.rows<T>(L.tanh_c, row0, H);
          p.c_prev = W.rows<T>(L.c_prev, row0, H);
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { lstm_forward_rows<T, true>(p, H, b0, b1); });
        } else {
          p.act = p.tanh_c = p.c_prev = nullptr;
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { lstm_forward_rows<T, false>(p, H, b0, b1); });
        }
        if (d.projected) {
          const Tensor h_unproj = at::from_blob(p.h, {rows, H}, opts);
          projection->compute_into(h_unproj, output.narrow(0, row0, rows), /*accumulate=*/false);
        }
      } else if (is_gru) {
        GruForwardStep<T> p;
        p.gx = gx_rows;
        p.gh = gh_rows;
        p.b_hh = bias_hh.data_ptr<A>();
        p.h_prev = h_prev;
        p.h = out_rows;
        if (training) {
          p.act = W.rows<T>(L.act, row0, 3 * H);
          p.gh_n = W.rows<T>(L.gh_n, row0, H);
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { gru_forward_rows<T, true>(p, H, b0, b1); });
        } else {
          p.act = p.gh_n = nullptr;
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { gru_forward_rows<T, false>(p, H, b0, b1); });
        }
      } else {
        RnnForwardStep<T> p{gx_rows, gh_rows, bias_hh.data_ptr<A>(), out_rows};
        if (d.kind == CellKind::RNN_TANH) {
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { rnn_forward_rows<T, Activation::Tanh>(p, H, b0, b1); });
        } else {
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { rnn_forward_rows<T, Activation::Relu>(p, H, b0, b1); });
        }
      }
      // The step's output is the next step's h for the rows that continue; rows that are not active
      // keep their last state, which is what h_n holds for sequences that already ended.
      std::memcpy(h_prev, out_rows, sizeof(T) * rows * P);
    }
  };
  for_each_band(row_bands(s, d), run_band);

  return forward_results(input, output, h_state, hx, c_state, is_lstm ? cx : OptTensor(), ws);
}

// The backward's time loop under the unit split (see layer_forward_unit_split): each thread owns a
// slice of the hidden units for the whole reverse loop. Per step, a thread forms dh for its units (the
// output's gradient plus the running one), runs the gate backward for them (writing their columns of
// the gate gradients, in the canonical layout the post-loop GEMMs read) and, after ONE barrier (the
// next product needs every column of the gate gradients), its columns of dh_prev = dG @ W_hh through
// its packed slice of W_hh^T. The running dh/dc of a unit are only ever touched by its owner, so the
// next step's gate pass needs no second barrier. Replaces a boxed oneDNN call, a fresh tensor and two
// fork/joins per step (13% of an nmt-enc LSTM training step in OpenMP waits, perf).
template <typename T>
void backward_loop_unit_split(const Schedule& s, const LayerDims& d, const std::vector<int64_t>& edges,
                              const Tensor& w_hh, const WorkspaceView& W, const Tensor& gout,
                              const Tensor& out2d, Tensor& dh_state, Tensor& dc_state, Tensor& dgi,
                              Tensor& dgh, const Tensor& db_i, const Tensor& db_h, bool reverse) {
  using A = acc_t<T>;
  const int64_t H = d.H, G = d.G, GH = d.G * d.H;
  const int64_t parts = static_cast<int64_t>(edges.size()) - 1;
  const WorkspaceLayout& L = W.layout;
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;
  const auto acc_opts = dh_state.options();
  const Tensor w_hh_t = w_hh.t().contiguous();  // (H, G*H): slice j's rows give dh_prev[:, slice]
  std::vector<int64_t> unit_rows(H);
  for (int64_t u = 0; u < H; ++u) unit_rows[u] = u;
  std::vector<SliceGemm<T>> gemms;
  std::vector<Tensor> dh_scratch;
  for (int64_t j = 0; j < parts; ++j) {
    gemms.emplace_back(w_hh_t, unit_rows.data() + edges[j], edges[j + 1] - edges[j]);
    dh_scratch.push_back(at::empty({s.max_batch, edges[j + 1] - edges[j]}, acc_opts));
  }
  const Tensor& dg_recurrent = is_gru ? dgh : dgi;  // the gradient of h W_hh^T (+ b_hh)
  run_unit_slices(parts, [&](int64_t k0, int64_t k1, const auto& sync) {
      for (int64_t j = k0; j < k1; ++j) gemms[j].prepare();
      A* dh_all = dh_state.data_ptr<A>();
      for (int64_t done = 0; done < s.steps(); ++done) {
        const int64_t step = s.steps() - 1 - done;
        const int64_t t = reverse ? s.steps() - 1 - step : step;
        const int64_t rows = s.batch[t], row0 = s.offset[t];
        for (int64_t j = k0; j < k1; ++j) {
          const int64_t u0 = edges[j], hj = edges[j + 1] - u0;
          A* dh = dh_scratch[j].data_ptr<A>();
          const T* g = gout.data_ptr<T>() + row0 * H + u0;
          for (int64_t b = 0; b < rows; ++b) {
            for (int64_t u = 0; u < hj; ++u) dh[b * hj + u] = dh_all[b * H + u0 + u] + A(g[b * H + u]);
          }
          for (int64_t b = 0; b < rows; ++b) {
            const int64_t row = row0 + b;
            T* dgi_row = dgi.data_ptr<T>() + row * GH + u0;
            A* dbi_row = kBiasRows<T> ? db_i.data_ptr<A>() + b * GH + u0 : nullptr;
            if (is_lstm) {
              lstm_backward_row<T>(hj, H, W.rows<T>(L.act, row, 4 * H) + u0, W.rows<T>(L.tanh_c, row, H) + u0,
                                   W.rows<T>(L.c_prev, row, H) + u0, dh + b * hj,
                                   dc_state.data_ptr<A>() + b * H + u0, dgi_row, dbi_row);
            } else if (is_gru) {
              gru_backward_row<T>(hj, H, W.rows<T>(L.act, row, 3 * H) + u0, W.rows<T>(L.gh_n, row, H) + u0,
                                  W.rows<T>(L.h_prev, row, H) + u0, dh + b * hj,
                                  dgi_row, dgh.data_ptr<T>() + row * GH + u0, dh_all + b * H + u0, dbi_row,
                                  kBiasRows<T> ? db_h.data_ptr<A>() + b * GH + u0 : nullptr);
            } else if (d.kind == CellKind::RNN_TANH) {
              rnn_backward_row<T, Activation::Tanh>(hj, out2d.data_ptr<T>() + row * H + u0, dh + b * hj, dgi_row,
                                                    dbi_row);
            } else {
              rnn_backward_row<T, Activation::Relu>(hj, out2d.data_ptr<T>() + row * H + u0, dh + b * hj, dgi_row,
                                                    dbi_row);
            }
          }
        }
        if (!sync(done)) return;
        for (int64_t j = k0; j < k1; ++j) {
          // dh_prev[:, slice] = dG W_hh[:, slice] (GRU: added to the direct term its gate pass wrote).
          gemms[j].run(rows, dg_recurrent.data_ptr<T>() + row0 * GH, GH, dh_all + edges[j], H,
                       /*accumulate=*/is_gru);
        }
      }
  });
}

// grad_output as (N, P) contiguous rows. The gradient of a sum of the output (a common loss term and
// the benchmarks' one) arrives expanded from one value (every stride 0): it is filled rather than
// copied element by element (its clone was ~44 us of a ~540 us seed-stock LSTM training step, in a
// fresh, page-faulting allocation). Other strided gradients are copied into a pooled buffer.
Tensor dense_rows(const Tensor& grad, int64_t N, int64_t P) {
  if (grad.is_contiguous()) return grad.reshape({N, P});
  Tensor rows = empty_buffer({N, P}, grad.options());
  const auto strides = grad.strides();
  if (grad.numel() > 0 && std::all_of(strides.begin(), strides.end(), [](int64_t st) { return st == 0; })) {
    rows.fill_(grad.as_strided({}, {}));
  } else {
    rows.view(grad.sizes()).copy_(grad);
  }
  return rows;
}

// The weight gradients of a small float32 layer (G*H <= 48 gate columns, I and P <= 16): MKL's sgemm
// runs these tall, thin products (N tokens deep) at 36-78 GF/s, and its OpenMP split along N did not
// make it faster (seed-stock LSTM: dW_ih and dW_hh took ~40 us each of a ~650 us training step, the
// 2-thread call slower than the 1-thread one). gradient_gemm (small_gemm.h) runs at 63-177 GF/s on
// one core for them (each shape ahead of MKL's); here each thread takes a share of the tokens and the
// bias column sums ride along.
template <typename T>
bool use_gradient_gemm(const LayerDims& d, const Tensor& x, const Tensor& h_prev_all) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    // Measured against at::mm on one and two threads (benchmarks/NOTES.md 20): ahead up to one column
    // block (48) of G*H; from 64 gate columns MKL's blocking is as fast or faster.
    return small_gemm_enabled() && d.G * d.H <= 48 && d.I <= 16 && d.P <= 16 && x.stride(1) == 1 &&
           h_prev_all.stride(1) == 1;
  }
}

// (grad_w_ih, grad_w_hh, column sums of dgi, column sums of dgh) for use_gradient_gemm's layers.
std::tuple<Tensor, Tensor, Tensor, Tensor> small_weight_gradients(const LayerDims& d, const Tensor& dgi,
                                                                  const Tensor& dgh, const Tensor& x,
                                                                  const Tensor& h_prev_all) {
  const int64_t N = x.size(0), GH = d.G * d.H, I = d.I, P = d.P;
  const bool separate_dgh = !dgh.is_same(dgi);  // GRU
  const int64_t parts = at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 512));
  const auto opts = x.options();
  Tensor grad_w_ih = at::zeros({GH, I}, opts), grad_w_hh = at::zeros({GH, P}, opts), sum_i = at::zeros({GH}, opts);
  Tensor sum_h = separate_dgh ? at::zeros({GH}, opts) : sum_i;
  const std::array<Tensor*, 4> results{&grad_w_ih, &grad_w_hh, &sum_i, &sum_h};
  const std::array<int64_t, 4> sizes{GH * I, GH * P, GH, GH};
  // Part 0 accumulates into the results; the others into their rows of `partial`, added after.
  const int64_t width = sizes[0] + sizes[1] + sizes[2] + sizes[3];
  Tensor partial = at::zeros({parts - 1, width}, opts);
  const auto run = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = N * p / parts, r1 = N * (p + 1) / parts;
      float* part = p == 0 ? nullptr : partial.data_ptr<float>() + (p - 1) * width;
      float* w_ih = p == 0 ? grad_w_ih.data_ptr<float>() : part;
      float* w_hh = p == 0 ? grad_w_hh.data_ptr<float>() : part + sizes[0];
      float* col_i = p == 0 ? sum_i.data_ptr<float>() : part + sizes[0] + sizes[1];
      float* col_h = p == 0 ? sum_h.data_ptr<float>() : part + sizes[0] + sizes[1] + sizes[2];
      gradient_gemm(r1 - r0, GH, I, dgi.data_ptr<float>() + r0 * dgi.stride(0), dgi.stride(0),
                    x.data_ptr<float>() + r0 * x.stride(0), x.stride(0), w_ih, I, col_i);
      gradient_gemm(r1 - r0, GH, P, dgh.data_ptr<float>() + r0 * dgh.stride(0), dgh.stride(0),
                    h_prev_all.data_ptr<float>() + r0 * h_prev_all.stride(0), h_prev_all.stride(0), w_hh, P,
                    separate_dgh ? col_h : nullptr);
    }
  };
  if (parts == 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, parts, 1, run);
  }
  for (int64_t p = 1; p < parts; ++p) {
    const float* part = partial.data_ptr<float>() + (p - 1) * width;
    for (int r = 0; r < (separate_dgh ? 4 : 3); ++r) {
      float* total = results[r]->data_ptr<float>();
      for (int64_t e = 0; e < sizes[r]; ++e) total[e] += part[e];
      part += sizes[r];
    }
  }
  return {grad_w_ih, grad_w_hh, sum_i, sum_h};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad_output, const Tensor& grad_hy, const OptTensor& grad_cy, const Tensor& input,
    const Schedule& s, const LayerDims& d, const Tensor& hx, const OptTensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const Tensor& output, const Tensor& ws, bool reverse, bool input_grad) {
  using A = acc_t<T>;
  const int64_t N = s.tokens, H = d.H, P = d.P, GH = d.G * d.H, B = d.B;
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<A>::value);
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;
  const WorkspaceLayout L(d.kind, H, P, d.projected);
  check_workspace(ws, L, N, input);
  const WorkspaceView W{ws, L, N};

  const Tensor gout = dense_rows(grad_output, N, P);
  const Tensor out2d = output.reshape({N, P}).contiguous();
  // The running state gradients in the compute type (float for bfloat16); the per-step GEMM results
  // are added into them (RowGemm::compute_into converts).
  Tensor dh_state = grad_hy.to(acc_opts, /*non_blocking=*/false, /*copy=*/true).contiguous();
  Tensor dc_state = !is_lstm ? at::empty({0}, acc_opts)
                    : (grad_cy.has_value()
                           ? grad_cy->to(acc_opts, /*non_blocking=*/false, /*copy=*/true).contiguous()
                           : at::zeros({B, H}, acc_opts));
  // dgi: gradients of x W_ih^T + b_ih per token; dgh of h W_hh^T + b_hh (the same matrix but for GRU).
  Tensor dgi = empty_buffer({N, GH}, opts);
  Tensor dgh = is_gru ? empty_buffer({N, GH}, opts) : dgi;
  Tensor dh_proj = d.projected ? empty_buffer({N, P}, opts) : Tensor();  // dL/d(projected h), per token
  // Bias-gradient rows in the compute type (see kBiasRows); b_hh's differ from b_ih's for GRU only.
  // (Allocated for bfloat16 even without biases: the passes write them unconditionally; B x G*H.)
  const bool bias_rows = kBiasRows<T>;
  Tensor db_i = bias_rows ? at::zeros({B, GH}, acc_opts) : Tensor();
  Tensor db_h = bias_rows && is_gru ? at::zeros({B, GH}, acc_opts) : db_i;
  const auto bias_row_ptr = [&](const Tensor& t, int64_t r0) {
    return t.defined() ? t.data_ptr<A>() + r0 * GH : nullptr;
  };

  RowGemm recurrent_t(w_hh.t(), B, N);  // dh_prev = dgh @ W_hh
  std::optional<RowGemm> projection_t;
  if (d.projected) projection_t.emplace(w_hr->t(), B, N);  // dh = dh_proj @ W_hr
  const int64_t grain = row_grain(d);

  // The reverse time loop over batch rows [r0, r1) (a band; see row_bands).
  auto run_band = [&](int64_t r0, int64_t r1) {
    if (r1 <= r0) return;
    Tensor dh_scratch = at::empty({r1 - r0, d.projected ? H : P}, acc_opts);
    for (int64_t step = s.steps() - 1; step >= 0; --step) {
      const int64_t t = reverse ? s.steps() - 1 - step : step;
      const int64_t rows = std::min(s.batch[t], r1) - r0;
      if (rows <= 0) continue;
      const int64_t row0 = s.offset[t] + r0;
      A* const dh_carried = dh_state.data_ptr<A>() + r0 * P;  // rows [r0, r0 + rows) of the running dh
      // Total gradient w.r.t. this step's h: from the output and from step t+1 (or h_n).
      A* dh_ptr = dh_scratch.data_ptr<A>();
      if (d.projected) {
        Tensor dh_p = dh_proj.narrow(0, row0, rows);
        at::add_out(dh_p, dh_state.narrow(0, r0, rows), gout.narrow(0, row0, rows));
        projection_t->compute_into(dh_p, dh_scratch.narrow(0, 0, rows), /*accumulate=*/false);
      } else {
        // A plain loop: at::add_out's dispatch was ~1.5 us a step and band for a few KB (seed-stock).
        const T* from_output = rows_of<T>(gout, row0, P);
        for (int64_t e = 0; e < rows * P; ++e) dh_ptr[e] = dh_carried[e] + A(from_output[e]);
      }
      T* dgi_rows = rows_of<T>(dgi, row0, GH);

      if (is_lstm) {
        LstmBackwardStep<T> p{W.rows<T>(L.act, row0, 4 * H), W.rows<T>(L.tanh_c, row0, H),
                              W.rows<T>(L.c_prev, row0, H), dh_ptr, dc_state.data_ptr<A>() + r0 * H,
                              dgi_rows, bias_row_ptr(db_i, r0)};
        parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { lstm_backward_rows<T>(p, H, b0, b1); });
        recurrent_rows_into<T>(recurrent_t, dgi, row0, rows, dh_state, r0, /*accumulate=*/false);
      } else if (is_gru) {
        GruBackwardStep<T> p{W.rows<T>(L.act, row0, 3 * H), W.rows<T>(L.gh_n, row0, H),
                             W.rows<T>(L.h_prev, row0, H), dh_ptr, dgi_rows, rows_of<T>(dgh, row0, GH),
                             dh_carried, bias_row_ptr(db_i, r0), bias_row_ptr(db_h, r0)};
        parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { gru_backward_rows<T>(p, H, b0, b1); });
        recurrent_rows_into<T>(recurrent_t, dgh, row0, rows, dh_state, r0, /*accumulate=*/true);
      } else {
        const T* h_rows = rows_of<T>(out2d, row0, P);
        if (d.kind == CellKind::RNN_TANH) {
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { rnn_backward_rows<T, Activation::Tanh>(h_rows, dh_ptr, dgi_rows, bias_row_ptr(db_i, r0), H, b0, b1); });
        } else {
          parallel_rows(rows, grain, [&](int64_t b0, int64_t b1) { rnn_backward_rows<T, Activation::Relu>(h_rows, dh_ptr, dgi_rows, bias_row_ptr(db_i, r0), H, b0, b1); });
        }
        recurrent_rows_into<T>(recurrent_t, dgi, row0, rows, dh_state, r0, /*accumulate=*/false);
      }
    }
  };
  if (const auto edges = unit_split_edges(s, d, w_ih, w_hh, /*backward=*/true); !edges.empty()) {
    backward_loop_unit_split<T>(s, d, edges, w_hh, W, gout, out2d, dh_state, dc_state, dgi, dgh, db_i, db_h,
                                reverse);
  } else {
    for_each_band(row_bands(s, d), run_band);
  }

  // The weight, input and bias gradients: one GEMM / one reduction each, over all tokens.
  const Tensor x = input.reshape({N, d.I});
  const Tensor h_prev_all = W.matrix(L.h_prev, P);
  Tensor grad_input =
      input_grad ? cpu::linear(dgi, w_ih.t(), std::nullopt).view(input.sizes()) : at::empty({0}, opts);
  Tensor grad_w_ih, grad_w_hh, dgi_colsum, dgh_colsum;
  if (!bias_rows && use_gradient_gemm<T>(d, x, h_prev_all)) {
    std::tie(grad_w_ih, grad_w_hh, dgi_colsum, dgh_colsum) = small_weight_gradients(d, dgi, dgh, x, h_prev_all);
  } else {
    grad_w_ih = at::mm(dgi.t(), x);
    grad_w_hh = at::mm(dgh.t(), h_prev_all);
    dgi_colsum = (bias_rows ? db_i : dgi).sum(0);
    dgh_colsum = is_gru ? (bias_rows ? db_h : dgh).sum(0) : dgi_colsum;
  }
  // In each bias's own dtype: float32 biases of a bfloat16 layer (autocast) get float32 gradients.
  Tensor grad_b_ih = b_ih.has_value() ? dgi_colsum.to(b_ih->scalar_type()) : at::empty({0}, opts);
  Tensor grad_b_hh =
      !b_hh.has_value() ? at::empty({0}, opts)
      : (is_gru || !b_ih.has_value() ? dgh_colsum : grad_b_ih.clone()).to(b_hh->scalar_type());
  Tensor grad_w_hr = d.projected ? at::mm(dh_proj.t(), W.matrix(L.h_unproj, H)) : at::empty({0}, opts);
  // grad_hx and grad_cx in hx's and cx's dtypes (float32 for a bfloat16 layer under autocast).
  const at::ScalarType c_dtype = is_lstm ? cx->scalar_type() : input.scalar_type();
  return {grad_input,           dh_state.to(hx.scalar_type()), dc_state.to(c_dtype), grad_w_ih,
          grad_w_hh,            grad_b_ih,                 grad_b_hh,                 grad_w_hr};
}

// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> recurrent_layer_forward_cpu(
    const Tensor& input, const OptTensor& batch_sizes, const Tensor& hx, const OptTensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, int64_t mode, bool reverse, bool training) {
  // Every ATen call below (GEMMs, reductions) must run in the dtype it is given whatever the caller's
  // autocast state: at::addmm/at::mm are on autocast's lists and would come back in bfloat16
  // (the "expected scalar type Float but found BFloat16" of issue 9). The row bands' worker threads
  // inherit this through at::ThreadLocalState.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_cpu_dtype(input);
  const Schedule s = make_schedule(input, batch_sizes);
  const LayerDims d = check_layer(input, s, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode,
                                  /*float_extras=*/true);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "recurrent_layer_forward", [&] {
    return layer_forward<scalar_t>(input, s, d, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                   training);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
recurrent_layer_backward_cpu(const Tensor& grad_output, const Tensor& grad_hy,
                             const OptTensor& grad_cy, const Tensor& input,
                             const OptTensor& batch_sizes, const Tensor& hx, const OptTensor& cx,
                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                             const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& output,
                             const Tensor& workspace, int64_t mode, bool reverse,
                             bool input_grad) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see forward
  check_cpu_dtype(input);
  const Schedule s = make_schedule(input, batch_sizes);
  const LayerDims d = check_layer(input, s, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode,
                                  /*float_extras=*/true);
  check_backward_inputs(grad_output, grad_hy, grad_cy, output, d, hx, cx, input);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "recurrent_layer_backward", [&] {
    return layer_backward<scalar_t>(grad_output, grad_hy, grad_cy, input, s, d, hx, cx, w_ih, w_hh, b_ih,
                                    b_hh, w_hr, output, workspace, reverse, input_grad);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("recurrent_layer_forward", &seqfast::cpu::recurrent_layer_forward_cpu);
  m.impl("recurrent_layer_backward", &seqfast::cpu::recurrent_layer_backward_cpu);
}
