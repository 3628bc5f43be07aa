#pragma once
// The fused pointwise kernels of the CUDA recurrent layers: one launch per time step, one thread per
// (batch row, hidden unit), calling the gate math of include/seqfast/gates.h (the same functions as the
// CPU loop). Declared here, defined and instantiated in recurrent_layer_pointwise.cu, which includes no
// ATen headers so that it compiles quickly; the host loops in recurrent_layer_{forward,backward}.cu
// fill the params structs and launch on PyTorch's current stream.
//
// T is the storage type (double, float, c10::Half, c10::BFloat16); A = at::opmath_type<T> is the
// compute type (float for the half types). Gate pre-activations from the GEMMs (gx, gh), the LSTM cell
// state and the running state gradients are kept in A; everything saved for the backward and every
// matrix that feeds a GEMM as an operand is in T.
//
// Row b of an (rows, w) matrix is at +b*w: every matrix here is contiguous. Pointers to step rows
// point at the step's row 0. Biases may be nullptr (bias=False).
//
// NOT YET RUN ON A GPU: these kernels are compile-checked only (see the README).

#include <cuda_runtime.h>

#include <cstdint>

namespace seqfast {
namespace cuda {

template <typename T, typename A>
struct LstmForwardParams {
  int64_t rows = 0, H = 0;     // rows = this step's batch size
  const A* gx = nullptr;       // (rows, 4H) x W_ih^T, no bias
  const A* gh = nullptr;       // (rows, 4H) h_prev W_hh^T, no bias
  const T* b_ih = nullptr;     // (4H) or nullptr
  const T* b_hh = nullptr;     // (4H) or nullptr
  A* c = nullptr;              // (B, H) cell state, updated in place (rows [0, rows))
  T* h_out = nullptr;          // (rows, H) o*tanh(c'): the output rows, or the unprojected h when projecting
  T* h_state = nullptr;        // (B, H) recurrent state, updated in place; nullptr when projecting
  // Saved for the backward (Save only): workspace rows of this step.
  T* act = nullptr;            // (rows, 4H) i, f, g, o
  T* tanh_c = nullptr;         // (rows, H)
  T* c_prev = nullptr;         // (rows, H)
  T* h_prev = nullptr;         // (rows, H) h_state before the step; nullptr when projecting
};

template <typename T, typename A>
struct GruForwardParams {
  int64_t rows = 0, H = 0;
  const A* gx = nullptr;       // (rows, 3H) x W_ih^T, no bias
  const A* gh = nullptr;       // (rows, 3H) h_prev W_hh^T, no bias
  const T* b_ih = nullptr;     // (3H) or nullptr
  const T* b_hh = nullptr;     // (3H) or nullptr
  T* h_state = nullptr;        // (B, H) h_prev in, h' out (each thread reads then writes its element)
  T* h_out = nullptr;          // (rows, H) output rows
  T* act = nullptr;            // (rows, 3H) saved r, z, n (Save only)
  T* gh_n = nullptr;           // (rows, H) saved W_hn h + b_hn
  T* h_prev = nullptr;         // (rows, H) saved h_prev
};

template <typename T, typename A>
struct RnnForwardParams {
  int64_t rows = 0, H = 0;
  const A* gx = nullptr;       // (rows, H)
  const A* gh = nullptr;       // (rows, H)
  const T* b_ih = nullptr;     // (H) or nullptr
  const T* b_hh = nullptr;     // (H) or nullptr
  T* h_state = nullptr;        // (B, H) in place
  T* h_out = nullptr;          // (rows, H)
  T* h_prev = nullptr;         // (rows, H) saved h_prev (Save only)
};

// Backward. The gradient w.r.t. this step's h is dh = dh_state + dh_gemm (+ grad_output rows):
//   dh_state (B, P) in A: the part of dL/dh that does not go through W_hh (grad_hy at the start;
//            GRU's z*dh afterwards); the kernel replaces it by the new non-GEMM part (0 for LSTM/RNN).
//   dh_gemm  (B, P) in A: dL/dh_prev through W_hh from the previously processed step, dG W_hh
//            (zero-initialized, so rows no step has written yet contribute nothing).
// Splitting the two keeps every accumulation in A: the per-step GEMM writes dh_gemm with an fp32
// output (at::mm with out_dtype) and this kernel adds it.

template <typename T, typename A>
struct LstmBackwardParams {
  int64_t rows = 0, H = 0;
  const T* act = nullptr;      // (rows, 4H) saved i, f, g, o
  const T* tanh_c = nullptr;   // (rows, H)
  const T* c_prev = nullptr;   // (rows, H)
  // Unprojected: dh = dh_state + dh_gemm + grad_out. Projected: dh = dh_unproj (already total).
  const T* grad_out = nullptr; // (rows, H) grad_output rows, or nullptr when projecting
  A* dh_state = nullptr;       // (B, H) set to 0 for rows [0, rows); nullptr when projecting
  const A* dh_gemm = nullptr;  // (B, H); nullptr when projecting
  const A* dh_unproj = nullptr;// (rows, H) when projecting, else nullptr
  A* dc = nullptr;             // (B, H) in: dL/dc' from the step after; out: dL/dc_prev
  T* dgates = nullptr;         // (rows, 4H) out: gradients of the four pre-activations
};

// Projected LSTM only: dh_proj = dh_state + dh_gemm + grad_out over (rows, P), stored in T for the
// GEMMs that follow (dh_unproj = dh_proj W_hr, and grad_w_hr after the loop); dh_state rows set to 0.
template <typename T, typename A>
struct ProjectionGradParams {
  int64_t rows = 0, P = 0;
  const T* grad_out = nullptr; // (rows, P)
  A* dh_state = nullptr;       // (B, P)
  const A* dh_gemm = nullptr;  // (B, P)
  T* dh_proj = nullptr;        // (rows, P) out
};

template <typename T, typename A>
struct GruBackwardParams {
  int64_t rows = 0, H = 0;
  const T* act = nullptr;      // (rows, 3H) r, z, n
  const T* gh_n = nullptr;     // (rows, H)
  const T* h_prev = nullptr;   // (rows, H)
  const T* grad_out = nullptr; // (rows, H)
  A* dh_state = nullptr;       // (B, H) in: non-GEMM part; out: z*dh for rows [0, rows)
  const A* dh_gemm = nullptr;  // (B, H)
  T* dgi = nullptr;            // (rows, 3H) out: grads of x W_ih^T + b_ih
  T* dgh = nullptr;            // (rows, 3H) out: grads of h W_hh^T + b_hh
};

template <typename T, typename A>
struct RnnBackwardParams {
  int64_t rows = 0, H = 0;
  const T* h = nullptr;        // (rows, H) this step's output h'
  const T* grad_out = nullptr; // (rows, H)
  A* dh_state = nullptr;       // (B, H) set to 0 for rows [0, rows)
  const A* dh_gemm = nullptr;  // (B, H)
  T* dpre = nullptr;           // (rows, H) out: gradient of the pre-activation
};

// Launchers: asynchronous on `stream`; they check the launch (cudaGetLastError), never synchronize.
template <typename T, typename A, bool Save>
void lstm_forward_pointwise(const LstmForwardParams<T, A>& p, cudaStream_t stream);
template <typename T, typename A, bool Save>
void gru_forward_pointwise(const GruForwardParams<T, A>& p, cudaStream_t stream);
template <typename T, typename A, bool Relu, bool Save>
void rnn_forward_pointwise(const RnnForwardParams<T, A>& p, cudaStream_t stream);

template <typename T, typename A>
void lstm_backward_pointwise(const LstmBackwardParams<T, A>& p, cudaStream_t stream);
template <typename T, typename A>
void projection_grad_pointwise(const ProjectionGradParams<T, A>& p, cudaStream_t stream);
template <typename T, typename A>
void gru_backward_pointwise(const GruBackwardParams<T, A>& p, cudaStream_t stream);
template <typename T, typename A, bool Relu>
void rnn_backward_pointwise(const RnnBackwardParams<T, A>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace seqfast
