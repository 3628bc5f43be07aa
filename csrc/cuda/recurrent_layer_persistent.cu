// The persistent small-batch forward of one recurrent layer/direction; the eligibility rule and the
// host entry points are declared in recurrent_layer_persistent.cuh.
//
// One cooperative launch runs all the time steps. Block k owns hidden units [k*U, k*U + U) and, for
// each, the G rows of W_hh that produce its gates (local row g*ub + u = global row g*H + k*U + u, ub =
// the block's unit count), which it copies into shared memory once. Per step:
//   1. stage: rows [0, bs) of h_{t-1} from the global ping-pong buffer into shared memory. Every block
//      reads all of h: this is the only data that crosses blocks.
//   2. sums:  each warp multiplies a group of W_hh rows with the bs rows of h, accumulating in A
//             (float32 for the half types, as the GEMM path's cuBLAS call does), into shared memory.
//   3. cell:  one thread per (row b, owned unit j) adds x W_ih^T and the biases and applies the cell
//             through recurrent_layer_cell.cuh, the code of the GEMM path's pointwise kernels, which
//             stores the output and workspace rows exactly as that path does; then h_t goes to the other
//             ping-pong buffer. That thread keeps h and the LSTM cell state of (b, j) in registers for
//             the whole sequence. Rows >= bs (finished, or in reverse not yet started) copy their h
//             forward unchanged.
//   4. grid.sync(): h_t is complete in global memory before any block stages it.
// Barriers per step: two __syncthreads and one grid.sync (none after the last step).
//
// Everything runs on PyTorch's current stream; the per-step batch sizes and offsets reach the device
// in one asynchronous copy before the launch, so nothing synchronizes with the host.
//
// NOT YET RUN ON A GPU: compile-checked only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <string_view>

#include "recurrent_layer_cell.cuh"
#include "recurrent_layer_cuda.h"
#include "recurrent_layer_persistent.cuh"
#include "seqfast/recurrent.h"

namespace seqfast {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBatch = 8;
constexpr int kMaxHidden = 1024;
// W_hh rows one warp multiplies together: they share the warp's loads of h from shared memory.
constexpr int kRowsPerWarp = 4;

// Elements of T per 16-byte load. The h buffers and the shared rows have Hp = H rounded up to a
// multiple of it, zero in the padding, so every row can be read in 16-byte pieces.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
union Vec16 {
  uint4 raw;
  T v[kVec<T>];
};

SEQFAST_HOST_DEVICE inline int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SEQFAST_HOST_DEVICE inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Byte offsets into a block's dynamic shared memory, computed by the same code on the host (size of
// the launch) and in the kernel:
//   part (k_splits, B, G*U) in A: partial sums of h W_hh^T of the step, one slice per column split
//   h    (pow2_at_least(B), Hp) in T: the step's h rows (rows >= bs hold stale values; their sums are
//        computed with the others and dropped)
//   w    (G*U, Hp) in T: this block's rows of W_hh
struct PersistentSmem {
  int64_t part = 0, h = 0, w = 0, bytes = 0;
  SEQFAST_HOST_DEVICE PersistentSmem(int G, int U, int B, int Hp, int k_splits, int a_bytes,
                                     int t_bytes) {
    h = round_up(int64_t(k_splits) * B * G * U * a_bytes, 16);
    w = h + int64_t(pow2_at_least(B)) * Hp * t_bytes;
    bytes = w + int64_t(G) * U * Hp * t_bytes;
  }
};

template <typename T, typename A>
struct PersistentParams {
  int64_t steps = 0;
  int B = 0, H = 0, Hp = 0;
  int units = 0;     // hidden units per block (plan.units_per_block)
  int k_splits = 1;  // plan.k_splits
  const int64_t* batch = nullptr;   // (steps) batch size of each step, in processing order
  const int64_t* offset = nullptr;  // (steps) first token row of each step, in processing order
  const A* gx = nullptr;            // (N, G*H) x W_ih^T, no bias
  const T* w_hh = nullptr;          // (G*H, H) contiguous
  const T* b_ih = nullptr;          // (G*H) or nullptr
  const T* b_hh = nullptr;          // (G*H) or nullptr
  const T* cx = nullptr;            // (B, H) LSTM only
  // (B, Hp) each, h_buf[0] = hx to start; step s reads h_buf[s % 2] and writes h_buf[(s + 1) % 2].
  // Written by every block and read by all: never through the read-only (non-coherent) path.
  T* h_buf[2] = {nullptr, nullptr};
  T* output = nullptr;              // (N, H)
  T* hy = nullptr;                  // (B, H)
  T* cy = nullptr;                  // (B, H) LSTM only
  // The workspace blocks of include/seqfast/recurrent.h at token row 0; nullptr unless training.
  T* ws_act = nullptr;              // (N, G*H) LSTM, GRU
  T* ws_tanh_c = nullptr;           // (N, H) LSTM
  T* ws_c_prev = nullptr;           // (N, H) LSTM
  T* ws_gh_n = nullptr;             // (N, H) GRU
  T* ws_h_prev = nullptr;           // (N, H)
};

// This warp's share of the step's h W_hh^T: for each group of kRowsPerWarp block rows it owns, the dot
// products with the NB h rows over its split of the columns, into part[ks][b][row]. NB is bs rounded
// up to a power of two, so that the batch loops unroll into registers; rows b >= bs are computed and
// not stored.
template <int NB, typename T, typename A>
__device__ __forceinline__ void gate_sums(const T* w_sm, const T* h_sm, A* part, int Hp, int rows,
                                          int part_rows, int B, int bs, int k_splits) {
  constexpr int V = kVec<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ks = warp % k_splits;
  const int chunks = Hp / V;
  for (int r0 = warp / k_splits * kRowsPerWarp; r0 < rows; r0 += kWarps / k_splits * kRowsPerWarp) {
    A acc[kRowsPerWarp][NB];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[rr][b] = A(0);
    }
    for (int c = ks * 32 + lane; c < chunks; c += 32 * k_splits) {
      A hv[NB][V];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        Vec16<T> x;
        x.raw = reinterpret_cast<const uint4*>(h_sm + b * Hp)[c];
#pragma unroll
        for (int v = 0; v < V; ++v) hv[b][v] = static_cast<A>(x.v[v]);
      }
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        // Past the block's last row the warp recomputes that row instead of branching; not stored.
        const int r = min(r0 + rr, rows - 1);
        Vec16<T> wv;
        wv.raw = reinterpret_cast<const uint4*>(w_sm + r * Hp)[c];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const A w = static_cast<A>(wv.v[v]);
#pragma unroll
          for (int b = 0; b < NB; ++b) acc[rr][b] += w * hv[b][v];
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        A sum = acc[rr][b];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        // Every lane holds the total; the lanes take turns storing so that lane 0 does not store all.
        if (lane == (rr * NB + b) % 32 && r0 + rr < rows && b < bs) {
          part[(ks * B + b) * part_rows + r0 + rr] = sum;
        }
      }
    }
  }
}

// The cell update of (row b, unit j) at the step starting at token row0, through the same
// per-element functions as the GEMM path; returns h'.
template <typename T, typename A, CellKind Kind, bool Save, int G>
__device__ __forceinline__ T cell_step(const PersistentParams<T, A>& p, int64_t row0, int b, int j,
                                       const A (&gi)[G], const A (&gh)[G], A& c, T h_prev) {
  const int64_t H = p.H;
  if constexpr (Kind == CellKind::LSTM) {
    LstmForwardParams<T, A> q;
    q.H = H;
    q.b_hh = p.b_hh;
    q.h_out = p.output + row0 * H;
    if (Save) {
      q.act = p.ws_act + row0 * 4 * H;
      q.tanh_c = p.ws_tanh_c + row0 * H;
      q.c_prev = p.ws_c_prev + row0 * H;
      q.h_prev = p.ws_h_prev + row0 * H;
    }
    return lstm_forward_element<T, A, Save>(q, b, j, gi, gh, c, h_prev);
  } else if constexpr (Kind == CellKind::GRU) {
    GruForwardParams<T, A> q;
    q.H = H;
    q.b_hh = p.b_hh;
    q.h_out = p.output + row0 * H;
    if (Save) {
      q.act = p.ws_act + row0 * 3 * H;
      q.gh_n = p.ws_gh_n + row0 * H;
      q.h_prev = p.ws_h_prev + row0 * H;
    }
    return gru_forward_element<T, A, Save>(q, b, j, gi, gh, h_prev);
  } else {
    RnnForwardParams<T, A> q;
    q.H = H;
    q.b_hh = p.b_hh;
    q.h_out = p.output + row0 * H;
    if (Save) q.h_prev = p.ws_h_prev + row0 * H;
    return rnn_forward_element<T, A, Kind == CellKind::RNN_RELU, Save>(q, b, j, gi[0], gh[0], h_prev);
  }
}

template <typename T, typename A, CellKind Kind, bool Save>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(const PersistentParams<T, A> p) {
  constexpr int G = Kind == CellKind::LSTM ? 4 : (Kind == CellKind::GRU ? 3 : 1);
  constexpr int V = kVec<T>;
  const int H = p.H, Hp = p.Hp, B = p.B, U = p.units;
  const int64_t GH = int64_t(G) * H;
  const int u0 = blockIdx.x * U;
  const int ub = min(U, H - u0);
  const int rows = G * ub;
  const int part_rows = G * U;
  const int tid = threadIdx.x;

  const PersistentSmem layout(G, U, B, Hp, p.k_splits, sizeof(A), sizeof(T));
  extern __shared__ __align__(16) unsigned char smem[];
  A* part = reinterpret_cast<A*>(smem + layout.part);
  T* h_sm = reinterpret_cast<T*>(smem + layout.h);
  T* w_sm = reinterpret_cast<T*>(smem + layout.w);

  // Once: this block's W_hh rows, zero in the padding columns (which meet h's zero padding).
  for (int i = tid; i < rows * Hp; i += kThreads) {
    const int r = i / Hp, col = i - r * Hp;
    const int g = r / ub, u = r - g * ub;
    w_sm[i] = col < H ? p.w_hh[(int64_t(g) * H + u0 + u) * H + col] : T(0);
  }
  // Rows of h_sm no step stages are read (and dropped) by gate_sums: make them finite.
  for (int i = tid; i < pow2_at_least(B) * Hp; i += kThreads) h_sm[i] = T(0);

  // The (row, unit) this thread updates in the cell phase, with its h and LSTM c in registers.
  const bool cell = tid < B * ub;
  const int cb = cell ? tid / ub : 0;
  const int cu = cell ? tid - cb * ub : 0;
  const int cj = u0 + cu;
  T h = cell ? p.h_buf[0][cb * Hp + cj] : T(0);
  A c = Kind == CellKind::LSTM && cell ? static_cast<A>(p.cx[cb * H + cj]) : A(0);
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t step = 0; step < p.steps; ++step) {
    const int bs = static_cast<int>(p.batch[step]);
    const int64_t row0 = p.offset[step];
    const bool active = cell && cb < bs;
    // Issued before the wait for h below, which it does not depend on, so the two loads overlap.
    A gi[G] = {};
    if (active) gates_of_row<G>(p.gx + row0 * GH, p.b_ih, H, cb, cj, gi);

    // 1. __ldcg: a coherent load from L2. Not __ldg (the read-only path may not see other blocks'
    //    writes), and not through L1, which may hold this buffer's lines from two steps ago.
    const uint4* h_global = reinterpret_cast<const uint4*>(p.h_buf[step & 1]);
    for (int i = tid; i < bs * Hp / V; i += kThreads) {
      reinterpret_cast<uint4*>(h_sm)[i] = __ldcg(h_global + i);
    }
    __syncthreads();

    // 2. Dispatch on the step's batch size (uniform over the block).
    switch (pow2_at_least(bs)) {
      case 1: gate_sums<1>(w_sm, h_sm, part, Hp, rows, part_rows, B, bs, p.k_splits); break;
      case 2: gate_sums<2>(w_sm, h_sm, part, Hp, rows, part_rows, B, bs, p.k_splits); break;
      case 4: gate_sums<4>(w_sm, h_sm, part, Hp, rows, part_rows, B, bs, p.k_splits); break;
      default: gate_sums<kMaxBatch>(w_sm, h_sm, part, Hp, rows, part_rows, B, bs, p.k_splits); break;
    }
    __syncthreads();

    // 3. The column splits are added in a fixed order: the result does not depend on timing.
    if (cell) {
      if (active) {
        A gh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const int r = g * ub + cu;
          A sum = part[cb * part_rows + r];
          for (int ks = 1; ks < p.k_splits; ++ks) sum += part[(ks * B + cb) * part_rows + r];
          gh[g] = sum;
        }
        h = cell_step<T, A, Kind, Save>(p, row0, cb, cj, gi, gh, c, h);
      }
      p.h_buf[(step + 1) & 1][cb * Hp + cj] = h;
    }
    // 4. The barrier also orders this step's reads of h_buf[step & 1] before the next step's writes.
    if (step + 1 < p.steps) grid.sync();
  }

  if (cell) {
    p.hy[cb * H + cj] = h;
    if (Kind == CellKind::LSTM) p.cy[cb * H + cj] = static_cast<T>(c);
  }
}

template <typename T, CellKind Kind>
const void* kernel_of(bool training) {
  using A = at::opmath_type<T>;
  return training ? reinterpret_cast<const void*>(&persistent_forward_kernel<T, A, Kind, true>)
                  : reinterpret_cast<const void*>(&persistent_forward_kernel<T, A, Kind, false>);
}

template <typename T>
const void* kernel_for(CellKind kind, bool training) {
  switch (kind) {
    case CellKind::LSTM: return kernel_of<T, CellKind::LSTM>(training);
    case CellKind::GRU: return kernel_of<T, CellKind::GRU>(training);
    case CellKind::RNN_TANH: return kernel_of<T, CellKind::RNN_TANH>(training);
    case CellKind::RNN_RELU: return kernel_of<T, CellKind::RNN_RELU>(training);
  }
  TORCH_CHECK(false, "seqfast: unknown cell kind ", static_cast<int64_t>(kind));
}

template <typename T>
std::optional<PersistentPlan> plan_for(const LayerDims& d, bool training, const cudaDeviceProp& prop) {
  using A = at::opmath_type<T>;
  const int G = static_cast<int>(d.G), H = static_cast<int>(d.H), B = static_cast<int>(d.B);
  const int sms = prop.multiProcessorCount;
  // The fewest units per block that needs no more blocks than SMs: one block per SM keeps each
  // SM's share of W_hh in one shared memory and stages h once per SM.
  const int U = static_cast<int>(ceil_div(H, sms));
  if (U * B > kThreads) return std::nullopt;
  const int blocks = static_cast<int>(ceil_div(H, U));
  const int Hp = static_cast<int>(round_up(H, kVec<T>));
  // Warps left idle by few row groups (small G*U) split the columns instead.
  const int groups = static_cast<int>(ceil_div(G * U, kRowsPerWarp));
  int k_splits = 1;
  while (k_splits * 2 * groups <= kWarps) k_splits *= 2;
  const PersistentSmem layout(G, U, B, Hp, k_splits, sizeof(A), sizeof(T));
  const int64_t optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
  if (layout.bytes > optin) return std::nullopt;

  const void* kernel = kernel_for<T>(d.kind, training);
  if (layout.bytes > 48 * 1024) {
    // The opt-in maximum rather than this layer's size: every call sets the same value, so calls
    // from several host threads cannot lower it under one another's launch.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(optin)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(layout.bytes)));
  // A cooperative launch needs every block resident at once.
  if (blocks > per_sm * sms) return std::nullopt;
  PersistentPlan plan;
  plan.blocks = blocks;
  plan.units_per_block = U;
  plan.k_splits = k_splits;
  plan.smem_bytes = layout.bytes;
  return plan;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    const PersistentPlan& plan, const Tensor& input, const Schedule& s, const LayerDims& d,
    const Tensor& hx, const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, bool reverse, bool training) {
  using A = at::opmath_type<T>;
  const int64_t N = s.tokens, H = d.H, GH = d.G * d.H, B = d.B, steps = s.steps();
  const int64_t Hp = round_up(H, kVec<T>);
  const auto opts = input.options();
  const bool is_lstm = d.kind == CellKind::LSTM, is_gru = d.kind == CellKind::GRU;

  // As in the GEMM path: the input projection of every step as one GEMM, in A, without bias.
  Tensor gx = at::empty({N, GH}, acc_options<T>(input));
  mm_acc_out<T>(gx, input.reshape({N, d.I}), w_ih.t());
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor bias_ih = b_ih.has_value() ? b_ih->contiguous() : Tensor();
  const Tensor bias_hh = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const Tensor cx_c = is_lstm ? cx->contiguous() : Tensor();

  // Batch sizes then offsets, in processing order, copied once. Pinned, so the copy is asynchronous;
  // the caching host allocator does not reuse the buffer before the copy has run.
  Tensor sched_host = at::empty({2 * steps}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* sched_ptr = sched_host.data_ptr<int64_t>();
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t t = reverse ? steps - 1 - step : step;
    sched_ptr[step] = s.batch[t];
    sched_ptr[steps + step] = s.offset[t];
  }
  const Tensor sched = sched_host.to(input.device(), at::kLong, /*non_blocking=*/true);

  Tensor h_buf = at::zeros({2, B, Hp}, opts);  // the padding columns stay zero
  h_buf.select(0, 0).narrow(1, 0, H).copy_(hx);
  Tensor output = at::empty({N, H}, opts);
  Tensor hy = at::empty({B, H}, opts);
  Tensor cy = is_lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  const WorkspaceLayout L(d.kind, H, H, /*projected=*/false);
  Tensor ws = at::empty({training ? N * L.columns : 0}, opts);
  const WorkspaceView W{ws, L, N};

  PersistentParams<T, A> p;
  p.steps = steps;
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.Hp = static_cast<int>(Hp);
  p.units = plan.units_per_block;
  p.k_splits = plan.k_splits;
  p.batch = sched.data_ptr<int64_t>();
  p.offset = p.batch + steps;
  p.gx = gx.data_ptr<A>();
  p.w_hh = w_hh_c.data_ptr<T>();
  p.b_ih = bias_ih.defined() ? bias_ih.data_ptr<T>() : nullptr;
  p.b_hh = bias_hh.defined() ? bias_hh.data_ptr<T>() : nullptr;
  p.cx = is_lstm ? cx_c.data_ptr<T>() : nullptr;
  p.h_buf[0] = h_buf.data_ptr<T>();
  p.h_buf[1] = p.h_buf[0] + B * Hp;
  p.output = output.data_ptr<T>();
  p.hy = hy.data_ptr<T>();
  p.cy = is_lstm ? cy.data_ptr<T>() : nullptr;
  if (training) {
    p.ws_h_prev = W.rows<T>(L.h_prev, 0, H);
    if (is_lstm || is_gru) p.ws_act = W.rows<T>(L.act, 0, GH);
    if (is_lstm) {
      p.ws_tanh_c = W.rows<T>(L.tanh_c, 0, H);
      p.ws_c_prev = W.rows<T>(L.c_prev, 0, H);
    }
    if (is_gru) p.ws_gh_n = W.rows<T>(L.gh_n, 0, H);
  }

  void* args[] = {&p};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel_for<T>(d.kind, training), dim3(plan.blocks),
                                             dim3(kThreads), args,
                                             static_cast<size_t>(plan.smem_bytes),
                                             at::cuda::getCurrentCUDAStream()));

  auto out_shape = input.sizes().vec();
  out_shape.back() = H;
  return {output.view(out_shape), hy, cy, ws};
}

}  // namespace

std::optional<PersistentPlan> plan_persistent_forward(const Tensor& input, const LayerDims& d,
                                                      bool training) {
  const char* env = std::getenv("SEQFAST_PERSISTENT_RNN");
  const std::string_view setting = env == nullptr ? "" : env;
  TORCH_CHECK(setting.empty() || setting == "0" || setting == "1",
              "seqfast: SEQFAST_PERSISTENT_RNN must be 0 (never use the persistent CUDA kernel, the "
              "default when unset) or 1 (use it where eligible), got '", setting, "'");
  // Opt-in until the kernel has run on a GPU (it is compile-checked only): a bug in a grid-synchronized
  // kernel can hang a training loop, which the per-step GEMM path cannot.
  if (setting != "1") return std::nullopt;
  if (d.projected || d.B < 1 || d.B > kMaxBatch || d.H > kMaxHidden) return std::nullopt;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return std::nullopt;
  // A CUDA graph would replay the schedule's copy from a pinned host buffer that the caching host
  // allocator may have handed out again by then; the GEMM path bakes the schedule into the launches.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return std::nullopt;
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                         "plan_persistent_forward", [&] {
    return plan_for<scalar_t>(d, training, *prop);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> persistent_layer_forward(
    const PersistentPlan& plan, const Tensor& input, const Schedule& s, const LayerDims& d,
    const Tensor& hx, const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, bool reverse, bool training) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                         "persistent_layer_forward", [&] {
    return layer_forward<scalar_t>(plan, input, s, d, hx, cx, w_ih, w_hh, b_ih, b_hh, reverse,
                                   training);
  });
}

}  // namespace cuda
}  // namespace seqfast
