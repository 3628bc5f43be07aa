"""Python side of the seqfast operators: differentiable wrappers, autograd and fake (meta) registration.

The kernels are registered in C++ (csrc/ops.cpp holds the schemas, csrc/cpu the CPU kernels); here the
backward op is wired in with torch.library.register_autograd and output shapes are described with
torch.library.register_fake, which is what lets torch.compile(fullgraph=True) and torch.export trace
through seqfast layers.
"""
import torch

from . import _extension

_extension.load()

# The `mode` argument of the recurrent ops (CellKind in csrc/include/seqfast/recurrent.h).
MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
_GATES = {0: 4, 1: 3, 2: 1, 3: 1}


def workspace_columns(mode: int, hidden_size: int, state_size: int, projected: bool) -> int:
    """Width of the per-token workspace; mirrors WorkspaceLayout in csrc/include/seqfast/recurrent.h."""
    H, P = hidden_size, state_size
    if mode == 0:
        return 4 * H + H + H + P + (H if projected else 0)
    if mode == 1:
        return 3 * H + H + H
    return H


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
    def like(t):
        return input.new_empty(t.shape) if t is not None else input.new_empty((0,))

    return (like(input if input_grad else None), like(hx), like(cx), like(w_ih), like(w_hh), like(b_ih), like(b_hh),
            like(w_hr))


def _setup_context(ctx, inputs, output):
    input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training = inputs
    out, _, _, workspace = output
    ctx.save_for_backward(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, out, workspace)
    ctx.mode, ctx.reverse, ctx.saved_workspace = mode, reverse, training


def _backward(ctx, grad_output, grad_hy, grad_cy, _grad_workspace):
    if not ctx.saved_workspace:
        raise RuntimeError(
            "seqfast: recurrent_layer_forward ran with training=False, so it saved nothing for the "
            "backward. Call it with training=True when gradients are needed."
        )
    input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, out, workspace = ctx.saved_tensors
    grads = torch.ops.seqfast.recurrent_layer_backward(
        grad_output, grad_hy, grad_cy if ctx.mode == 0 else None, input, batch_sizes, hx, cx, w_ih,
        w_hh, b_ih, b_hh, w_hr, out, workspace, ctx.mode, ctx.reverse, ctx.needs_input_grad[0])
    g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr = grads
    return (g_input if ctx.needs_input_grad[0] else None, None, g_hx, g_cx if cx is not None else None, g_w_ih, g_w_hh,
            g_b_ih if b_ih is not None else None, g_b_hh if b_hh is not None else None,
            g_w_hr if w_hr is not None else None, None, None, None)


torch.library.register_autograd(
    "seqfast::recurrent_layer_forward", _backward, setup_context=_setup_context)


def recurrent_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode: int,
                    reverse: bool, training: bool):
    """One recurrent layer in one direction (differentiable). See csrc/ops.cpp for the shapes.

    Returns (output, h_n, c_n); c_n is an empty tensor for GRU/RNN.
    """
    args = (input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training)
    if torch.compiler.is_compiling() or _needs_autograd(args):
        output, hy, cy, _ = torch.ops.seqfast.recurrent_layer_forward(*args)
    else:
        # Nothing to differentiate: skip the Python autograd kernel that register_autograd installs
        # (it would only redispatch). Measured on a 1x16 LSTM step: 19.5 -> 11.5 us per call.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            output, hy, cy, _ = torch.ops.seqfast.recurrent_layer_forward(*args)
    return output, hy, cy


def _needs_autograd(args):
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
