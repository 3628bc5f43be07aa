"""The varlen layout of the attention ops (FlashAttention's ``flash_attn_varlen_func`` contract).

Tokens of one sequence are contiguous rows, sequences follow each other in the user's batch order, and
``cu_seqlens`` (int32, B+1) holds the offsets. Padded memory needs no copy: it is the same layout with
``cu_seqlens = b * Tk`` and ``seqused = lengths`` (FlashAttention's ``seqused_k``), so the kernels
never read the padding. A ``PackedSequence`` (time-major, sorted by length) is converted once here.
"""
from typing import NamedTuple, Optional

import torch
from torch.nn.utils.rnn import PackedSequence


class Varlen(NamedTuple):
    """Rows of B sequences in the varlen layout.

    data:         (N, D) rows, sequence b at [cu_seqlens[b], cu_seqlens[b+1]) (its first seqused[b]
                  rows are used when seqused is given)
    cu_seqlens:   int32 (B+1)
    seqused:      int32 (B) or None
    max_seqlen:   Python int, the padded width (Tk, or the longest packed sequence)
    batch_size:   Python int, B
    to_packed:    int64 (N,) or None; for PackedSequence input, the varlen row of every packed row
                  (``data.index_select(0, to_packed)`` gives back PackedSequence.data's order)
    """

    data: torch.Tensor
    cu_seqlens: torch.Tensor
    seqused: Optional[torch.Tensor]
    max_seqlen: int
    batch_size: int
    to_packed: Optional[torch.Tensor]


def _offsets(step: int, count: int) -> torch.Tensor:
    return torch.arange(count + 1, dtype=torch.int32) * step


def from_padded(x: torch.Tensor, lengths=None) -> Varlen:
    """x: (B, T, D) batch-first padded; lengths: (B,) ints or None (all T). No copy of x."""
    if x.dim() != 3:
        raise ValueError(f"seqfast: expected a padded batch-first tensor (B, T, D), got shape {tuple(x.shape)}")
    B, T, D = x.shape
    seqused = None
    if lengths is not None:
        seqused = torch.as_tensor(lengths, device="cpu").to(torch.int32)
        if seqused.shape != (B,):
            raise ValueError(f"seqfast: memory_lengths must have shape ({B},), got {tuple(seqused.shape)}")
    return Varlen(x.reshape(B * T, D), _offsets(T, B), seqused, T, B, None)


def gather_padded(x: torch.Tensor, lengths) -> Varlen:
    """x: (B, T, D) padded, lengths (B,): copies the used rows into a packed varlen layout.

    For callers that run a GEMM over every memory row (concat's W_m h): it then skips the padding, and
    whatever the padding holds (NaN, Inf) never enters an arithmetic operation, forward or backward.
    The number of rows depends on the lengths' values, so this is for eager mode only.
    """
    B, T, D = x.shape
    lengths = torch.as_tensor(lengths, device="cpu").to(torch.int64)
    if lengths.shape != (B,):
        raise ValueError(f"seqfast: memory_lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if bool(((lengths < 0) | (lengths > T)).any()):
        bad = int(((lengths < 0) | (lengths > T)).nonzero()[0, 0])
        raise RuntimeError(f"seqfast: memory_lengths[{bad}] = {int(lengths[bad])} is outside [0, {T}], the "
                           f"padded memory length")
    valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    rows = valid.reshape(-1).nonzero().squeeze(1).to(x.device)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return Varlen(x.reshape(B * T, D).index_select(0, rows), cu, None, T, B, None)


def from_rows(x: torch.Tensor, rows_per_sequence: int) -> Varlen:
    """x: (B, T, D) or (B, D) (T = 1) where every row is real (queries)."""
    if x.dim() == 2:
        return Varlen(x, _offsets(1, x.shape[0]), None, 1, x.shape[0], None)
    B, T, D = x.shape
    return Varlen(x.reshape(B * T, D), _offsets(T, B), None, T, B, None)


def from_packed(ps: PackedSequence) -> Varlen:
    """PackedSequence (any enforce_sorted) -> varlen rows in the user's batch order (one gather)."""
    batch_sizes = ps.batch_sizes.to("cpu", torch.int64)
    T = batch_sizes.shape[0]
    B = int(batch_sizes[0])
    sorted_pos = torch.arange(B)
    # lengths in sorted order, and the packed row of (time t, sorted position k)
    lengths_sorted = (batch_sizes.unsqueeze(1) > sorted_pos.unsqueeze(0)).sum(0)
    step_offset = torch.cumsum(batch_sizes, 0) - batch_sizes
    packed_row = step_offset.unsqueeze(1) + sorted_pos.unsqueeze(0)  # (T, B sorted)
    if ps.unsorted_indices is not None:
        user_to_sorted = ps.unsorted_indices.to("cpu", torch.int64)
    else:
        user_to_sorted = sorted_pos
    lengths = lengths_sorted[user_to_sorted]  # user order
    rows = packed_row[:, user_to_sorted].t()  # (B user, T)
    valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    gather = rows[valid]  # (N,) packed row of every varlen row, batch-major in user order
    to_packed = torch.empty_like(gather)
    to_packed[gather] = torch.arange(gather.shape[0])
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    data = ps.data.index_select(0, gather.to(ps.data.device))
    return Varlen(data, cu, None, T, B, to_packed.to(ps.data.device))


def to_packed_like(rows: torch.Tensor, layout: Varlen, like: PackedSequence) -> PackedSequence:
    """Varlen rows (N, ...) produced from ``from_packed(like)`` back into a PackedSequence like ``like``."""
    return PackedSequence(rows.index_select(0, layout.to_packed), like.batch_sizes, like.sorted_indices,
                          like.unsorted_indices)


def lengths_of(layout: Varlen) -> torch.Tensor:
    """int64 (B,) lengths of a layout."""
    if layout.seqused is not None:
        return layout.seqused.to(torch.int64)
    return (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).to(torch.int64)
