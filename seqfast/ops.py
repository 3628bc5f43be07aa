"""Python side of the seqfast operators: differentiable wrappers, autograd and fake (meta) registration.

The kernels are registered in C++ (csrc/ops.cpp holds the schemas, csrc/cpu and csrc/cuda the kernels,
csrc/autograd.cpp the recurrent layer's autograd); here the attention backward ops are wired in with
torch.library.register_autograd, and output shapes are described with torch.library.register_fake,
which is what lets torch.compile(fullgraph=True) and torch.export trace through seqfast layers.
"""
import torch

from . import _extension, func

_extension.load()

# The `mode` argument of the recurrent ops (CellKind in csrc/include/seqfast/recurrent.h).
MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
_GATES = func._GATES


def workspace_columns(mode: int, hidden_size: int, state_size: int, projected: bool) -> int:
    """Width of the per-token workspace; mirrors WorkspaceLayout in csrc/include/seqfast/recurrent.h."""
    return sum(func.workspace_blocks(mode, hidden_size, state_size, projected))


def _tokens(input, batch_sizes):
    return input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]


@torch.library.register_fake("seqfast::recurrent_layer_forward")
def _recurrent_layer_forward_fake(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode,
                                  reverse, training):
    hidden = w_ih.shape[0] // _GATES[mode]
    state = hx.shape[-1]
    output = input.new_empty((*input.shape[:-1], state))
    hy = hx.new_empty(hx.shape)
    cy = cx.new_empty(cx.shape) if mode == 0 else input.new_empty((0,))
    cols = workspace_columns(mode, hidden, state, w_hr is not None)
    workspace = input.new_empty((_tokens(input, batch_sizes) * cols if training else 0,))
    return output, hy, cy, workspace


@torch.library.register_fake("seqfast::recurrent_layer_backward")
def _recurrent_layer_backward_fake(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, cx, w_ih,
                                   w_hh, b_ih, b_hh, w_hr, output, workspace, mode, reverse,
                                   input_grad=True):
    def like(t):  # a gradient has its tensor's dtype (float32 biases of a bfloat16 layer: float32)
        return t.new_empty(t.shape) if t is not None else input.new_empty((0,))

    return (like(input if input_grad else None), like(hx), like(cx), like(w_ih), like(w_hh), like(b_ih), like(b_hh),
            like(w_hr))


@torch.library.register_fake("seqfast::cell_forward")
def _cell_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    return hx.new_empty(hx.shape), (cx.new_empty(cx.shape) if mode == 0 else input.new_empty((0,)))


@torch.library.register_fake("seqfast::cell_backward")
def _cell_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, b_ih, b_hh, output, workspace,
                        mode, input_grad):
    def like(t):
        return input.new_empty(t.shape) if t is not None else input.new_empty((0,))

    return (like(input if input_grad else None), like(hx), like(cx), like(w_ih), like(w_hh), like(b_ih),
            like(b_hh))


# The autograd kernel of recurrent_layer_forward is C++ (csrc/autograd.cpp): a Python one, from
# torch.library.register_autograd, cost more per call than a small cell step's whole math.


def recurrent_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode: int,
                    reverse: bool, training: bool):
    """One recurrent layer in one direction (differentiable). See csrc/ops.cpp for the shapes.

    Returns (output, h_n, c_n); c_n is an empty tensor for GRU/RNN.
    """
    if _transforms_active():
        # torch.func cannot enter the C++ autograd kernel; the Python autograd.Function can (func.py).
        output, hy, cy, _ = func.RecurrentLayerFunction.apply(
            input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training)
    else:
        output, hy, cy, _ = _RECURRENT_LAYER_FORWARD(
            input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training)
    return output, hy, cy


# The overload itself: calling it skips the packet's overload resolution on every layer and cell step.
_RECURRENT_LAYER_FORWARD = torch.ops.seqfast.recurrent_layer_forward.default
# One eager cell step, (B, I) input: (hy, cy). CPU only; never under tracing, torch.compile or a
# torch.func transform (seqfast/nn/rnn.py _cell_step keeps those on recurrent_layer, which they know).
# The overload's C++ callable itself: OpOverload.__call__ is one more Python frame (~0.2 us of a ~5 us
# cell step) that only forwards its arguments to it.
CELL_FORWARD = torch.ops.seqfast.cell_forward.default._op
# One C call (~0.1 us): whether any torch.func transform (grad, vjp, vmap, jvp...) is active.
_transforms_active = func.transforms_active
torch_implementation_needed = func.torch_implementation_needed


# =====================================================================================================
# Attention (seqfast::attention_*, additive_attention_*, location_attention_*): varlen memory, one
# fused kernel per score family. Shapes in csrc/ops.cpp; layout and math in
# csrc/include/seqfast/attention.h. The forward ops return (context, lse, weights); lse is saved for
# the backward (which recomputes the probabilities from it) and is not differentiable.
# =====================================================================================================

def _attention_outputs_fake(rows, memory, max_seqlen_k, need_weights):
    context = memory.new_empty((rows.shape[0], memory.shape[1]))
    # lse is in the kernels' accumulation type: float32 for float16/bfloat16 memory (CUDA).
    lse_dtype = torch.float32 if memory.dtype in (torch.float16, torch.bfloat16) else memory.dtype
    lse = memory.new_empty((rows.shape[0],), dtype=lse_dtype)
    weights = memory.new_empty((rows.shape[0], max_seqlen_k) if need_weights else (0,))
    return context, lse, weights


@torch.library.register_fake("seqfast::attention_forward")
def _attention_forward_fake(query, memory, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_k, scale,
                            need_weights):
    return _attention_outputs_fake(query, memory, max_seqlen_k, need_weights)


@torch.library.register_fake("seqfast::attention_backward")
def _attention_backward_fake(grad_context, grad_weights, query, memory, cu_seqlens_q, cu_seqlens_k,
                             seqused_k, lse, max_seqlen_k, scale):
    return torch.empty_like(query), torch.empty_like(memory)


@torch.library.register_fake("seqfast::additive_attention_forward")
def _additive_attention_forward_fake(query_proj, memory_proj, memory, v, cu_seqlens_q, cu_seqlens_k,
                                     seqused_k, max_seqlen_k, need_weights):
    return _attention_outputs_fake(query_proj, memory, max_seqlen_k, need_weights)


@torch.library.register_fake("seqfast::additive_attention_backward")
def _additive_attention_backward_fake(grad_context, grad_weights, query_proj, memory_proj, memory, v,
                                      cu_seqlens_q, cu_seqlens_k, seqused_k, lse, max_seqlen_k):
    return (torch.empty_like(query_proj), torch.empty_like(memory_proj), torch.empty_like(memory),
            torch.empty_like(v))


@torch.library.register_fake("seqfast::location_attention_forward")
def _location_attention_forward_fake(scores, memory, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                     max_seqlen_k, need_weights):
    return _attention_outputs_fake(scores, memory, max_seqlen_k, need_weights)


@torch.library.register_fake("seqfast::location_attention_backward")
def _location_attention_backward_fake(grad_context, grad_weights, scores, memory, cu_seqlens_q,
                                      cu_seqlens_k, seqused_k, lse, max_seqlen_k):
    return torch.empty_like(scores), torch.empty_like(memory)


def _weights_grad(ctx, grad_weights):
    # Only a gradient that reached the returned weights matters; an empty placeholder never does.
    return grad_weights if ctx.need_weights and grad_weights is not None else None


def _attention_setup_context(ctx, inputs, output):
    query, memory, cu_q, cu_k, seqused_k, max_seqlen_k, scale, need_weights = inputs
    ctx.save_for_backward(query, memory, cu_q, cu_k, seqused_k, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.max_seqlen_k, ctx.scale, ctx.need_weights = max_seqlen_k, scale, need_weights


def _attention_backward(ctx, grad_context, _grad_lse, grad_weights):
    query, memory, cu_q, cu_k, seqused_k, lse = ctx.saved_tensors
    grad_query, grad_memory = torch.ops.seqfast.attention_backward(
        grad_context, _weights_grad(ctx, grad_weights), query, memory, cu_q, cu_k, seqused_k, lse,
        ctx.max_seqlen_k, ctx.scale)
    return grad_query, grad_memory, None, None, None, None, None, None


torch.library.register_autograd(
    "seqfast::attention_forward", _attention_backward, setup_context=_attention_setup_context)
# What the modules call: torch.func-friendly (seqfast/func.py).
attention_forward = func.transform_friendly(
    torch.ops.seqfast.attention_forward.default, _attention_setup_context, _attention_backward)


def _additive_attention_setup_context(ctx, inputs, output):
    query_proj, memory_proj, memory, v, cu_q, cu_k, seqused_k, max_seqlen_k, need_weights = inputs
    ctx.save_for_backward(query_proj, memory_proj, memory, v, cu_q, cu_k, seqused_k, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.max_seqlen_k, ctx.need_weights = max_seqlen_k, need_weights


def _additive_attention_backward(ctx, grad_context, _grad_lse, grad_weights):
    query_proj, memory_proj, memory, v, cu_q, cu_k, seqused_k, lse = ctx.saved_tensors
    grads = torch.ops.seqfast.additive_attention_backward(
        grad_context, _weights_grad(ctx, grad_weights), query_proj, memory_proj, memory, v, cu_q, cu_k,
        seqused_k, lse, ctx.max_seqlen_k)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd(
    "seqfast::additive_attention_forward", _additive_attention_backward,
    setup_context=_additive_attention_setup_context)
# What the modules call: torch.func-friendly (seqfast/func.py).
additive_attention_forward = func.transform_friendly(
    torch.ops.seqfast.additive_attention_forward.default, _additive_attention_setup_context,
    _additive_attention_backward)


def _location_attention_setup_context(ctx, inputs, output):
    scores, memory, cu_q, cu_k, seqused_k, max_seqlen_k, need_weights = inputs
    ctx.save_for_backward(scores, memory, cu_q, cu_k, seqused_k, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.max_seqlen_k, ctx.need_weights = max_seqlen_k, need_weights


def _location_attention_backward(ctx, grad_context, _grad_lse, grad_weights):
    scores, memory, cu_q, cu_k, seqused_k, lse = ctx.saved_tensors
    grad_scores, grad_memory = torch.ops.seqfast.location_attention_backward(
        grad_context, _weights_grad(ctx, grad_weights), scores, memory, cu_q, cu_k, seqused_k, lse,
        ctx.max_seqlen_k)
    return grad_scores, grad_memory, None, None, None, None, None


torch.library.register_autograd(
    "seqfast::location_attention_forward", _location_attention_backward,
    setup_context=_location_attention_setup_context)
# What the modules call: torch.func-friendly (seqfast/func.py).
location_attention_forward = func.transform_friendly(
    torch.ops.seqfast.location_attention_forward.default, _location_attention_setup_context,
    _location_attention_backward)
# ================================================ end of attention ===================================
