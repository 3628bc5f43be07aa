"""torch.func support for the seqfast ops: Python-visible autograd paths and vmap batching rules.

Plain eager calls go through the C++ autograd kernel of seqfast::recurrent_layer_forward
(csrc/autograd.cpp), which is the fast path. functorch cannot see inside a C++ torch::autograd::Function
("cannot use C++ torch::autograd::Function with functorch transforms"), so while a transform (grad, vjp,
jacrev, vmap, ...) is active, seqfast.ops.recurrent_layer calls RecurrentLayerFunction below instead: the
same forward and backward ops, wired together by a Python torch.autograd.Function with a separate
setup_context, which is the form the transforms accept. The attention ops get the same treatment from
transform_friendly (their eager autograd kernel, from torch.library.register_autograd, is also refused).

vmap: torch.library.register_vmap gives both ops a batching rule. The forward folds the mapped dimension
into the op's batch dimension, so one kernel call serves the whole vmapped batch. The backward cannot
fold: the kernel sums the weight gradients over its batch, and vmap needs one weight gradient per example
(per-sample gradients, jacrev's rows), so it runs one backward call per example. Cases the forward cannot
fold (parameters or packed data mapped: each example has its own weights or its own batch_sizes) also
run one call per example.

Forward-mode AD (jvp, jacfwd) has no kernel here (it would need a tangent recurrence), and the backward
kernel has no derivative: the modules in seqfast.nn run torch's own implementation while a forward-AD
level is active or differentiating transforms are nested (see torch_implementation_needed), which is as
far as torch.nn goes.
"""
import torch
import torch.autograd.forward_ad as _fwAD
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from . import _extension

_extension.load()

_FORWARD = torch.ops.seqfast.recurrent_layer_forward.default
_BACKWARD = torch.ops.seqfast.recurrent_layer_backward.default

# The tensor arguments of the forward op that are per-example state (batch rows) and the ones that are
# shared parameters; index into the op's argument list.
_INPUT, _BATCH_SIZES, _HX, _CX = 0, 1, 2, 3
_PARAMS = (4, 5, 6, 7, 8)  # w_ih, w_hh, b_ih, b_hh, w_hr

_GATES = {0: 4, 1: 3, 2: 1, 3: 1}  # gate blocks per mode: LSTM, GRU, RNN tanh, RNN relu


def workspace_blocks(mode: int, hidden_size: int, state_size: int, projected: bool):
    """Widths of the workspace's column blocks, in order; mirrors WorkspaceLayout in
    csrc/include/seqfast/recurrent.h (LSTM: act, tanh_c, c_prev, h_prev[, h_unproj]; GRU: act, gh_n,
    h_prev; RNN: h_prev)."""
    H, P = hidden_size, state_size
    if mode == 0:
        return [4 * H, H, H, P] + ([H] if projected else [])
    if mode == 1:
        return [3 * H, H, H]
    return [H]


transforms_active = torch._C._are_functorch_transforms_active


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (torch.func.jvp/jacfwd, or torch.autograd.forward_ad)."""
    return _fwAD._current_level >= 0


def _differentiating_levels() -> int:
    differentiating = (TransformType.Grad, TransformType.Jvp)
    return sum(i.key() in differentiating for i in retrieve_all_functorch_interpreters())


def _nested_differentiation() -> bool:
    """Whether this backward runs inside another differentiating transform, which would differentiate it.

    functorch keeps the transform whose backward is running on its interpreter stack, so one Grad (or
    Jvp) interpreter is this backward's own; a second one is an outer transform.
    """
    return _differentiating_levels() > 1


def torch_implementation_needed() -> bool:
    """Whether the modules must run torch's own implementation instead of the fused ops: under forward-mode
    AD (the kernels have no tangent recurrence), and under nested differentiating transforms (grad of
    grad, jacrev of jacrev, hessian: the backward kernel has no derivative). Cheap when neither is on."""
    # forward_ad_active() inlined: this runs on every eager cell step.
    return _fwAD._current_level >= 0 or (transforms_active() and _differentiating_levels() > 1)


class RecurrentLayerFunction(torch.autograd.Function):
    """seqfast::recurrent_layer_forward/backward as a Python autograd.Function, for torch.func."""

    # Under vmap, torch vmaps forward and backward, which reach the ops' batching rules below.
    generate_vmap_rule = True

    @staticmethod
    def forward(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training):
        return _FORWARD(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training = inputs
        out, _, cy, workspace = output
        ctx.save_for_backward(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, out, workspace)
        ctx.mode, ctx.reverse, ctx.training = mode, reverse, training
        ctx.mark_non_differentiable(workspace, *(() if mode == 0 else (cy,)))
        # Only the gradients that reached an output are passed; the backward zero-fills the others.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy, _grad_workspace):
        if not ctx.training:
            raise RuntimeError(
                "seqfast: recurrent_layer_forward ran with training=False, so it saved nothing for the "
                "backward. Call it with training=True when gradients are needed.")
        input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, output, workspace = ctx.saved_tensors
        _refuse_nested_differentiation()
        # Nothing differentiates this backward (checked above): run the kernel untracked, as the C++
        # path does; functorch's transforms otherwise call backward with grad mode on.
        with torch.no_grad():
            grads = _BACKWARD(
                grad_output if grad_output is not None else torch.zeros_like(output),
                grad_hy if grad_hy is not None else torch.zeros_like(hx),
                grad_cy if ctx.mode == 0 else None,
                input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, output, workspace,
                ctx.mode, ctx.reverse, ctx.needs_input_grad[_INPUT])
        g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr = grads

        def present(t, g):
            return g if t is not None else None

        return (g_input if ctx.needs_input_grad[_INPUT] else None, None, g_hx, present(cx, g_cx), g_w_ih,
                g_w_hh, present(b_ih, g_b_ih), present(b_hh, g_b_hh), present(w_hr, g_w_hr), None, None,
                None)


def _refuse_nested_differentiation():
    if _nested_differentiation():
        # The backward kernels have no derivative of their own. Eager double backward of the recurrent
        # layers re-runs them through torch's implementation in C++ (csrc/autograd.cpp), which functorch
        # cannot enter.
        raise RuntimeError(
            "seqfast: higher-order derivatives under torch.func (grad of grad, jacrev of jacrev, hessian) "
            "are not supported: the fused backward kernels have no derivative. Eager double backward of "
            "the recurrent layers works: torch.autograd.grad(..., create_graph=True)")


def transform_friendly(op, setup_context, backward):
    """`op` as a callable that runs it directly in eager mode and, while a functorch transform is active,
    through a Python autograd.Function built from the op's torch.library.register_autograd pieces.

    torch.library.register_autograd's own autograd kernel is an autograd.Function without a
    setup_context staticmethod, which functorch refuses ("it must override the setup_context
    staticmethod"); this one has it.
    """

    def forward(*args):
        return op(*args)  # grad mode is off here: the op's autograd kernel just redispatches

    def backward_untracked(ctx, *grads):
        _refuse_nested_differentiation()
        with torch.no_grad():  # see RecurrentLayerFunction.backward
            return backward(ctx, *grads)

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"seqfast: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is not supported "
            f"by seqfast::{op._opname}: its fused kernel has no tangent implementation. Use reverse mode "
            f"(torch.func.grad, vjp, jacrev).")

    function = type(f"{op._opname}_function", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_untracked),
        "jvp": staticmethod(jvp),
    })

    def call(*args):
        if transforms_active():
            return function.apply(*args)
        return op(*args)

    return call


# ---------------------------------------------------------------------------------------------------
# vmap batching rules. `V` is the vmapped size; per example the op sees input (T, B, I) or packed data,
# hx (B, P), cx (B, H).

def _per_example(info, in_dims, args, op):
    """One op call per example; every output gets batch dim 0. Used where the batch cannot be folded."""
    results = []
    for v in range(info.batch_size):
        sliced = [a.select(d, v) if d is not None else a for a, d in zip(args, in_dims)]
        results.append(op(*sliced))
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)


def _fold(t, dim, V, batch_dim):
    """(..., B, ...) with the vmapped dim at `dim` (None: shared) -> the V*B rows at `batch_dim`."""
    if dim is None:
        t = t.unsqueeze(batch_dim).expand(*t.shape[:batch_dim], V, *t.shape[batch_dim:])
    else:
        t = t.movedim(dim, batch_dim)
    return t.flatten(batch_dim, batch_dim + 1)


def _forward_vmap(info, in_dims, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse,
                  training):
    args = (input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    foldable = batch_sizes is None and all(in_dims[i] is None for i in _PARAMS)
    if not foldable:
        # Per-example parameters (model ensembles) or per-example packed batch_sizes: no common batch.
        return _per_example(info, in_dims[:9], args,
                            lambda *a: _FORWARD(*a, mode, reverse, training))
    V = info.batch_size
    d = in_dims[_INPUT]
    T, B = (input if d is None else input.movedim(d, 0)[0]).shape[:2]
    output, hy, cy, workspace = _FORWARD(
        _fold(input, in_dims[_INPUT], V, 1), None, _fold(hx, in_dims[_HX], V, 0),
        _fold(cx, in_dims[_CX], V, 0) if cx is not None else None,
        w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training)
    output = output.unflatten(1, (V, B))
    hy = hy.unflatten(0, (V, B))
    cy, cy_dim = (cy.unflatten(0, (V, B)), 0) if mode == 0 else (cy, None)
    ws_dim = None
    if workspace.numel():
        # The workspace is column blocks, each (N, width) row-major over the N = T*V*B tokens
        # (WorkspaceLayout in csrc/include/seqfast/recurrent.h). Regroup it per example, so that example
        # v's slice is the workspace a call on that example alone would have made: the backward rule
        # hands each example its own slice.
        hidden = w_ih.shape[0] // _GATES[mode]
        widths = workspace_blocks(mode, hidden, hx.shape[-1], w_hr is not None)
        blocks = workspace.split([T * V * B * w for w in widths])
        workspace = torch.cat([b.view(T, V, B * w).transpose(0, 1).reshape(V, -1)
                               for b, w in zip(blocks, widths)], 1)
        ws_dim = 0
    return (output, hy, cy, workspace), (1, 0, cy_dim, ws_dim)


def _backward_vmap(info, in_dims, *args):
    # The kernel sums weight gradients over its batch; vmap needs them per example: one call each.
    tensors, flags = args[:14], args[14:]
    return _per_example(info, in_dims[:14], tensors, lambda *a: _BACKWARD(*a, *flags))


torch.library.register_vmap("seqfast::recurrent_layer_forward", _forward_vmap)
torch.library.register_vmap("seqfast::recurrent_layer_backward", _backward_vmap)


def _attention_vmap(op):
    # The attention ops take varlen rows with per-sequence offsets (cu_seqlens); folding a mapped
    # dimension would mean rebuilding those offsets for V times the sequences. One call per example.
    return lambda info, in_dims, *args: _per_example(info, in_dims, args, op)


for _name in ("attention_forward", "attention_backward", "additive_attention_forward",
              "additive_attention_backward", "location_attention_forward", "location_attention_backward"):
    torch.library.register_vmap(f"seqfast::{_name}", _attention_vmap(getattr(torch.ops.seqfast, _name).default))
