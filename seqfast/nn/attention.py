"""Attention for RNN encoder-decoders (Luong 2015, Bahdanau 2015) over memories of different lengths.

    attn = seqfast.nn.Attention(query_size, memory_size, score="general")
    context, weights = attn(query, memory, memory_lengths)

The memory is kept in the varlen layout (seqfast/varlen.py) and each score family runs one fused
kernel (csrc/cpu/attention_kernel.cpp): no work on padding, no (B, Tq, Tk) score tensor unless the
weights are asked for, and for ``concat`` never the (B, Tq, Tk, A) tensor of the textbook version.
The large projections are single GEMMs outside the kernels: ``general`` multiplies the queries by W
(so its kernel is the dot kernel), ``concat`` projects all queries and all memory rows once.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.nn.utils.rnn import PackedSequence

from .. import ops
from .. import varlen

SCORES = ("dot", "scaled_dot", "general", "concat", "location")


class AttentionCache(NamedTuple):
    """The memory-side work of one batch, done once by Attention.precompute.

    memory:       (Nk, Dm) memory rows in the varlen layout
    memory_proj:  (Nk, A) memory W_m^T (+ b) for concat, else None
    cu_seqlens_k: int32 (B+1); seqused_k: int32 (B) or None (see seqfast/varlen.py)
    max_seqlen_k: int, the width of the returned weights; batch_size: int
    """

    memory: torch.Tensor
    memory_proj: Optional[torch.Tensor]
    cu_seqlens_k: torch.Tensor
    seqused_k: Optional[torch.Tensor]
    max_seqlen_k: int
    batch_size: int


class Attention(nn.Module):
    """Attention of decoder states (queries) over an encoder's outputs (memory).

    score:
      "dot"         s . h                                   (query_size == memory_size)
      "scaled_dot"  s . h / sqrt(memory_size)               (query_size == memory_size)
      "general"     s^T W h, ``weight`` (query_size, memory_size)
      "concat"      v^T tanh(W_q s + W_m h (+ b)), ``w_query`` (A, query_size), ``w_memory``
                    (A, memory_size), ``v`` (A), ``bias`` (A) when bias=True; A = attn_size or
                    memory_size
      "location"    softmax over positions of W s, ``weight`` (max_memory_len, query_size)

    forward(query, memory, memory_lengths=None, need_weights=True) -> (context, weights)
      query:   (B, Dq) one decoder step, (B, Tq, Dq) all steps, or a PackedSequence of decoder states
      memory:  (B, Tk, Dm) padded batch-first with memory_lengths (B,), or a PackedSequence
      context: (B, Dm) / (B, Tq, Dm) / PackedSequence like the query
      weights: (B, Tk) / (B, Tq, Tk) / PackedSequence like the query with rows of width Tk, zero past
               each length; None unless need_weights. Tk: the padded width (longest packed sequence).
    A length-0 memory gives a zero context and zero weights (the padded reference gives NaN).
    """

    def __init__(self, query_size, memory_size, score="general", attn_size=None, max_memory_len=None,
                 bias=False, device=None, dtype=None):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"seqfast.nn.Attention: score must be one of {SCORES}, got {score!r}")
        if score in ("dot", "scaled_dot") and query_size != memory_size:
            raise ValueError(
                f"seqfast.nn.Attention: score={score!r} needs query_size == memory_size, got "
                f"{query_size} and {memory_size}; use score='general' or 'concat' for different sizes")
        if score == "location" and not max_memory_len:
            raise ValueError("seqfast.nn.Attention: score='location' needs max_memory_len (the number of "
                             "positions its weight scores)")
        if bias and score != "concat":
            raise ValueError("seqfast.nn.Attention: bias=True is only used by score='concat'")
        factory = {"device": device, "dtype": dtype}
        self.query_size, self.memory_size, self.score = query_size, memory_size, score
        self.attn_size = (attn_size or memory_size) if score == "concat" else None
        self.max_memory_len = max_memory_len if score == "location" else None
        if score == "general":
            self.weight = nn.Parameter(torch.empty(query_size, memory_size, **factory))
        elif score == "concat":
            A = self.attn_size
            self.w_query = nn.Parameter(torch.empty(A, query_size, **factory))
            self.w_memory = nn.Parameter(torch.empty(A, memory_size, **factory))
            self.v = nn.Parameter(torch.empty(A, **factory))
            self.bias = nn.Parameter(torch.empty(A, **factory)) if bias else None
        elif score == "location":
            self.weight = nn.Parameter(torch.empty(max_memory_len, query_size, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            bound = 1.0 / math.sqrt(p.shape[-1])
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self):
        s = f"{self.query_size}, {self.memory_size}, score={self.score!r}"
        if self.score == "concat":
            s += f", attn_size={self.attn_size}, bias={self.bias is not None}"
        if self.score == "location":
            s += f", max_memory_len={self.max_memory_len}"
        return s

    # ----------------------------------------------------------------------------------------------
    def precompute(self, memory, memory_lengths=None) -> AttentionCache:
        """The memory-side work, once per batch: the varlen layout and, for concat, W_m h (+ b)."""
        if isinstance(memory, PackedSequence):
            if memory_lengths is not None:
                raise ValueError("seqfast.nn.Attention: memory_lengths must be None for a PackedSequence "
                                 "memory (its lengths are in the PackedSequence)")
            layout = varlen.from_packed(memory)
            rows = layout.data
        else:
            if memory.dim() != 3 or memory.shape[-1] != self.memory_size:
                raise ValueError(f"seqfast.nn.Attention: memory must be (B, Tk, {self.memory_size}) padded "
                                 f"batch-first or a PackedSequence, got shape {tuple(memory.shape)}")
            layout = varlen.from_padded(memory, memory_lengths)
            rows = layout.data
            if self.score == "concat" and layout.seqused is not None:
                # concat runs a GEMM over every memory row. Eager: copy the used rows out, so the GEMM
                # skips the padding. Compiled or under FakeTensorMode (the row count would depend on the
                # lengths' values): zero the padded rows, so that whatever they hold (NaN, Inf) cannot
                # reach W_m's gradient as 0 * NaN.
                if torch.compiler.is_compiling() or detect_fake_mode(memory) is not None:
                    B, Tk = memory.shape[:2]
                    valid = torch.arange(Tk).unsqueeze(0) < layout.seqused.unsqueeze(1)
                    rows = torch.where(valid.reshape(B * Tk, 1).to(rows.device), rows, 0.0)
                else:
                    layout = varlen.gather_padded(memory, memory_lengths)
                    rows = layout.data
        if rows.shape[-1] != self.memory_size:
            raise ValueError(f"seqfast.nn.Attention: memory rows have {rows.shape[-1]} features, "
                             f"expected memory_size={self.memory_size}")
        memory_proj = None
        if self.score == "concat":
            memory_proj = nn.functional.linear(rows, self.w_memory, self.bias)
        return AttentionCache(layout.data if self.score != "concat" else rows, memory_proj,
                              layout.cu_seqlens, layout.seqused, layout.max_seqlen, layout.batch_size)

    def step(self, query_t, cache: AttentionCache, need_weights=True):
        """One decoder step: query_t (B, Dq) -> context (B, Dm), weights (B, Tk) or None."""
        if query_t.dim() != 2:
            raise ValueError(f"seqfast.nn.Attention.step: query_t must be (B, {self.query_size}), got "
                             f"shape {tuple(query_t.shape)}")
        return self._attend(query_t, cache, need_weights)

    def forward(self, query, memory, memory_lengths=None, need_weights=True):
        if torch.onnx.is_in_onnx_export():  # ONNX has no varlen kernels: padded math (seqfast/onnx.py)
            from .. import onnx as _onnx
            return _onnx.attention_forward(self, query, memory, memory_lengths, need_weights)
        return self._attend(query, self.precompute(memory, memory_lengths), need_weights)

    # ----------------------------------------------------------------------------------------------
    def _attend(self, query, cache, need_weights):
        if isinstance(query, PackedSequence):
            layout = varlen.from_packed(query)
        elif query.dim() in (2, 3):
            layout = varlen.from_rows(query, 1)
        else:
            raise ValueError(f"seqfast.nn.Attention: query must be (B, Dq), (B, Tq, Dq) or a PackedSequence, "
                             f"got shape {tuple(query.shape)}")
        if layout.batch_size != cache.batch_size:
            raise ValueError(f"seqfast.nn.Attention: the query has {layout.batch_size} sequences but the "
                             f"memory has {cache.batch_size}")
        if layout.data.shape[-1] != self.query_size:
            raise ValueError(f"seqfast.nn.Attention: query has {layout.data.shape[-1]} features, expected "
                             f"query_size={self.query_size}")
        context, weights = self._kernel(layout.data, layout.cu_seqlens, cache, need_weights)
        if isinstance(query, PackedSequence):
            context = varlen.to_packed_like(context, layout, query)
            weights = varlen.to_packed_like(weights, layout, query) if need_weights else None
        else:
            context = context.reshape(*query.shape[:-1], self.memory_size)
            weights = weights.reshape(*query.shape[:-1], cache.max_seqlen_k) if need_weights else None
        return context, weights

    def _kernel(self, q, cu_seqlens_q, cache, need_weights):
        """q: (Nq, Dq) varlen queries -> context (Nq, Dm), weights (Nq, Tk) or an empty tensor."""
        args = (cu_seqlens_q, cache.cu_seqlens_k, cache.seqused_k, cache.max_seqlen_k)
        if self.score in ("dot", "scaled_dot", "general"):
            scale = 1.0 / math.sqrt(self.memory_size) if self.score == "scaled_dot" else 1.0
            if self.score == "general":
                q = q @ self.weight
            context, _, weights = ops.attention_forward(
                q, cache.memory, *args, scale, need_weights)
        elif self.score == "concat":
            query_proj = nn.functional.linear(q, self.w_query)
            context, _, weights = ops.additive_attention_forward(
                query_proj, cache.memory_proj, cache.memory, self.v, *args, need_weights)
        else:
            scores = nn.functional.linear(q, self.weight)
            context, _, weights = ops.location_attention_forward(
                scores, cache.memory, *args, need_weights)
        return context, weights
