#pragma once
// What the CPU and CUDA implementations of seqfast::recurrent_layer_{forward,backward} agree on:
// the cell kinds, and the layout of the workspace the forward saves for the backward.
// seqfast/ops.py mirrors workspace_columns() for the fake (meta) implementation.

#include <cstdint>

#include "seqfast/macros.h"

namespace seqfast {

// Same numbering as the `mode` argument of the ops.
enum class CellKind : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

SEQFAST_HOST_DEVICE inline int64_t gate_count(CellKind kind) {
  return kind == CellKind::LSTM ? 4 : (kind == CellKind::GRU ? 3 : 1);
}

// The workspace is one flat buffer of N rows-blocks, N = number of (time step, sequence) tokens in
// time-major packed order. Each block is an (N, width) row-major matrix, so the backward can hand the
// blocks straight to the big post-loop GEMMs. H = hidden_size, P = the recurrent state width
// (proj_size if > 0 else H).
//   LSTM: act (N,4H) i,f,g,o after their nonlinearity | tanh_c (N,H) tanh(c') | c_prev (N,H) |
//         h_prev (N,P) | h_unproj (N,H) o*tanh(c'), only when projecting (P != H or proj flag)
//   GRU:  act (N,3H) r,z,n | gh_n (N,H) W_hn h + b_hn | h_prev (N,H)
//   RNN:  h_prev (N,H)
struct WorkspaceLayout {
  int64_t act = 0, tanh_c = 0, c_prev = 0, gh_n = 0, h_prev = 0, h_unproj = 0;  // column offsets
  int64_t columns = 0;  // total width; the buffer holds N * columns elements

  SEQFAST_HOST_DEVICE WorkspaceLayout(CellKind kind, int64_t H, int64_t P, bool projected) {
    int64_t at = 0;
    if (kind == CellKind::LSTM) {
      act = at;     at += 4 * H;
      tanh_c = at;  at += H;
      c_prev = at;  at += H;
      h_prev = at;  at += P;
      if (projected) { h_unproj = at; at += H; }
    } else if (kind == CellKind::GRU) {
      act = at;     at += 3 * H;
      gh_n = at;    at += H;
      h_prev = at;  at += H;
    } else {
      h_prev = at;  at += H;
    }
    columns = at;
  }
  // Start of the block that begins at column offset `col` in a workspace of N tokens.
  SEQFAST_HOST_DEVICE int64_t block(int64_t col, int64_t N) const { return col * N; }
};

}  // namespace seqfast
