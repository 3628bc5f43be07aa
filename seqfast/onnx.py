"""ONNX export of the seqfast operators: each recurrent layer call becomes a standard ONNX LSTM/GRU/RNN.

The export glue lives here, beside the ops; the modules know nothing of ONNX (the one exception is
seqfast.nn.Attention, whose varlen kernels have no ONNX counterpart: while exporting it runs the padded
math of seqfast/reference.py, which the exporters translate op by op).

One call of ``seqfast::recurrent_layer_forward`` (one layer, one direction) maps to one ONNX node with
``direction`` "forward" or "reverse", so onnxruntime, OpenVINO or TensorRT run it with their own
kernels. Differences of layout, handled here:
  * gate order: ONNX LSTM stacks i, o, f, c (torch i, f, g, o); ONNX GRU z, r, h (torch r, z, n), and
    torch's GRU formula (b_hn inside the reset product) is ONNX's ``linear_before_reset=1``;
  * one (W, R, B) triple with a leading direction axis; B = concat(W_b, R_b);
  * X (T, B, I) time-major, Y (T, directions, B, H), Y_h (directions, B, H).
No ONNX equivalent: LSTM ``proj_size`` and PackedSequence input (ONNX's sequence_lens assumes
left-aligned padded sequences, not torch's time-major packed rows); both raise an error naming the
feature, as torch.nn's own export does for proj_size.

Exporters (both work on a plain ``torch.onnx.export`` call after ``import seqfast``):
  * ``dynamo=False`` (TorchScript): the symbolic is registered with
    ``torch.onnx.register_custom_op_symbolic``.
  * ``dynamo=True``: torch 2.13 has no public registry of its own for custom ops (it builds one per
    export), but it reads onnxscript's torch_lib registry, where the translation is registered (see
    register_dynamo_translations). The same translation is also offered as
    ``seqfast.onnx.custom_translation_table`` for ``custom_translation_table=``, and
    ``seqfast.onnx.export`` passes it. Needs the ``onnxscript`` package, as torch's exporter does.
"""
import importlib.abc
import importlib.util
import sys
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence

from . import ops, reference  # noqa: F401  (ops: the table below names the seqfast ops)

# The legacy exporter asks for a symbolic per opset; 9 is the lowest with LSTM/GRU/RNN as used here
# and a registration at 9 serves every later opset too.
_LEGACY_OPSET = 9

_ONNX_OP = {0: "LSTM", 1: "GRU", 2: "RNN", 3: "RNN"}
_RNN_ACTIVATION = {2: "Tanh", 3: "Relu"}
# For each ONNX gate slot, the torch gate it takes (torch LSTM i,f,g,o -> ONNX i,o,f,c; torch GRU
# r,z,n -> ONNX z,r,h).
_ONNX_GATE_FROM_TORCH = {0: (0, 3, 1, 2), 1: (1, 0, 2), 2: (0,), 3: (0,)}


def gate_rows(mode: int, hidden_size: int) -> list:
    """Row permutation taking a torch (G*H, .) weight or (G*H,) bias to ONNX's gate order."""
    return [g * hidden_size + j for g in _ONNX_GATE_FROM_TORCH[mode] for j in range(hidden_size)]


def _unsupported(batch_sizes_given: bool, projected: bool):
    if batch_sizes_given:
        raise RuntimeError(
            "seqfast: ONNX export of a PackedSequence input is not supported: ONNX LSTM/GRU/RNN take "
            "padded input with per-sequence lengths, not packed rows. Export with a padded (T, B, I) "
            "input instead.")
    if projected:
        raise RuntimeError(
            "seqfast: ONNX export of LSTM with proj_size > 0 is not supported: the ONNX LSTM operator "
            "has no projection (torch.nn.LSTM's export fails the same way).")


def _node_attributes(mode: int, reverse: bool, hidden_size: int) -> dict:
    attrs = {"hidden_size": hidden_size, "direction": "reverse" if reverse else "forward"}
    if mode == 1:
        attrs["linear_before_reset"] = 1
    if mode in _RNN_ACTIVATION:
        attrs["activations"] = [_RNN_ACTIVATION[mode]]
    return attrs


# ---------------------------------------------------------------------------------------------------
# dynamo=False: TorchScript symbolic.

def _legacy_symbolic(g, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse,
                     training):
    from torch.onnx import symbolic_helper as sh

    mode = sh._get_const(mode, "i", "mode")
    reverse = bool(sh._get_const(reverse, "b", "reverse"))
    _unsupported(not sh._is_none(batch_sizes), not sh._is_none(w_hr))
    hidden_size = sh._get_tensor_dim_size(w_hh, 0) // len(_ONNX_GATE_FROM_TORCH[mode])
    order = g.op("Constant", value_t=torch.tensor(gate_rows(mode, hidden_size), dtype=torch.int64))

    def per_direction(t):  # torch (G*H, ...) -> ONNX (1, G*H, ...) in ONNX gate order
        return sh._unsqueeze_helper(g, g.op("Gather", t, order, axis_i=0), [0])

    absent = sh._optional_input_placeholder_tensor
    bias = absent(g)
    if not sh._is_none(b_ih):
        bias = g.op("Concat", per_direction(b_ih), per_direction(b_hh), axis_i=1)
    initial = [sh._unsqueeze_helper(g, hx, [0])]
    if mode == 0:
        initial.append(sh._unsqueeze_helper(g, cx, [0]))
    attrs = {f"{k}_{'i' if isinstance(v, int) else 's'}": v  # jit attribute kinds: int, str(s)
             for k, v in _node_attributes(mode, reverse, hidden_size).items()}
    # sequence_lens is absent: padded input, every sequence full length.
    outs = g.op(_ONNX_OP[mode], input, per_direction(w_ih), per_direction(w_hh), bias, absent(g),
                *initial, outputs=3 if mode == 0 else 2, **attrs)
    output = sh._squeeze_helper(g, outs[0], [1])
    hy = sh._squeeze_helper(g, outs[1], [0])
    # The workspace (and cy of GRU/RNN) is empty at inference; nothing reads it after export.
    empty = g.op("Constant", value_t=torch.zeros(0))
    cy = sh._squeeze_helper(g, outs[2], [0]) if mode == 0 else empty
    return output, hy, cy, empty


def _register_legacy():
    torch.onnx.register_custom_op_symbolic("seqfast::recurrent_layer_forward", _legacy_symbolic,
                                           _LEGACY_OPSET)


# ---------------------------------------------------------------------------------------------------
# dynamo=True: onnxscript translation (traced: plain Python building ONNX ops on symbolic values).

def _recurrent_layer_forward_onnx(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr,
                                  mode: int, reverse: bool, training: bool):
    from onnxscript import opset18 as op

    _unsupported(batch_sizes is not None, w_hr is not None)
    hidden_size = w_hh.shape[0] // len(_ONNX_GATE_FROM_TORCH[mode])
    order = op.Constant(value_ints=gate_rows(mode, hidden_size))
    axis0 = op.Constant(value_ints=[0])

    def per_direction(t):
        return op.Unsqueeze(op.Gather(t, order, axis=0), axis0)

    bias = None
    if b_ih is not None:
        bias = op.Concat(per_direction(b_ih), per_direction(b_hh), axis=1)
    initial = [op.Unsqueeze(hx, axis0)]
    if mode == 0:
        initial.append(op.Unsqueeze(cx, axis0))
    onnx_op = getattr(op, _ONNX_OP[mode])
    outs = onnx_op(input, per_direction(w_ih), per_direction(w_hh), bias, None, *initial,
                   **_node_attributes(mode, reverse, hidden_size))
    output = op.Squeeze(outs[0], op.Constant(value_ints=[1]))
    hy = op.Squeeze(outs[1], axis0)
    empty = op.ConstantOfShape(op.Constant(value_ints=[0]),
                               value=_zero_like_dtype(input))
    cy = op.Squeeze(outs[2], axis0) if mode == 0 else empty
    return output, hy, cy, empty


def _zero_like_dtype(value):
    import numpy as np
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(int(value.dtype)) if value.dtype is not None else \
        np.float32
    return onnx.numpy_helper.from_array(np.zeros(1, dtype=dtype))


# ---------------------------------------------------------------------------------------------------
# seqfast.nn.Attention: its varlen kernels have no ONNX counterpart, so while exporting its forward runs
# the padded math of seqfast/reference.py (standard MatMul/Softmax/Where ops, padding masked).

def attention_forward(module, query, memory, memory_lengths, need_weights):
    """seqfast.nn.Attention.forward during torch.onnx.export (either exporter)."""
    if isinstance(query, PackedSequence) or isinstance(memory, PackedSequence):
        raise RuntimeError(
            "seqfast: ONNX export of seqfast.nn.Attention with a PackedSequence query or memory is not "
            "supported; export it with a padded (B, Tk, D) memory and memory_lengths.")
    params = {name: getattr(module, name, None) for name in ("weight", "w_query", "w_memory", "v", "bias")}
    if memory_lengths is not None:
        # seqfast's kernels never read the padding: zero it, so that whatever it holds (NaN, Inf) cannot
        # reach the result as 0 * NaN.
        lengths = torch.as_tensor(memory_lengths, device=memory.device)
        pad = torch.arange(memory.shape[1], device=memory.device).unsqueeze(0) >= lengths.unsqueeze(1)
        memory = torch.where(pad.unsqueeze(-1), torch.zeros_like(memory), memory)
    context, weights = reference.attention(query, memory, memory_lengths, module.score, **params)
    if memory_lengths is not None:
        # seqfast's kernels give a length-0 memory a zero context and zero weights; the reference's
        # softmax over nothing but -inf gives NaN.
        empty = (lengths == 0).reshape(-1, *([1] * (context.dim() - 1)))
        context = torch.where(empty, torch.zeros_like(context), context)
        weights = torch.where(empty, torch.zeros_like(weights), weights)
    return context, (weights if need_weights else None)


custom_translation_table = {
    torch.ops.seqfast.recurrent_layer_forward.default: _recurrent_layer_forward_onnx,
}


def export(model, args=(), f=None, *, custom_translation_table=None, **kwargs):
    """torch.onnx.export(dynamo=True) with the seqfast translations added to the caller's table."""
    table = dict(globals()["custom_translation_table"])
    table.update(custom_translation_table or {})
    kwargs.setdefault("dynamo", True)
    return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)


# ---------------------------------------------------------------------------------------------------
# dynamo=True without a table: torch builds each export's registry from onnxscript's torch_lib registry
# (where torchvision's nms/roi_align translations live too), so a translation registered there is found
# by a plain torch.onnx.export(dynamo=True). Importing onnxscript costs ~1.4 s, too much for every
# `import seqfast`: the registration runs when the exporter itself imports torch_lib's ops (a one-shot
# post-import hook), or at once if that already happened.

_TORCHLIB_OPS = "onnxscript.function_libs.torch_lib.ops"


def register_dynamo_translations():
    """Put the seqfast translations in onnxscript's torch_lib registry (idempotent)."""
    from onnxscript.function_libs.torch_lib.registration import default_registry, torch_op

    for target, function in custom_translation_table.items():
        name = target.name()  # "seqfast::recurrent_layer_forward"
        if name not in default_registry:
            torch_op(name, trace_only=True)(function)


class _AfterTorchlibImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of torch_lib's ops to register seqfast's after it ran."""

    def find_spec(self, name, path, target=None):
        if name != _TORCHLIB_OPS:
            return None
        sys.meta_path.remove(self)  # one shot, and lets the lookup below reach the real finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register_dynamo_translations()
            except Exception as error:  # onnxscript internals moved: the explicit table still works
                warnings.warn(
                    f"seqfast: could not register the ONNX translations with onnxscript ({error!r}); "
                    "pass custom_translation_table=seqfast.onnx.custom_translation_table to "
                    "torch.onnx.export(dynamo=True), or use seqfast.onnx.export")

        spec.loader.exec_module = exec_then_register
        return spec


def _register_dynamo_on_import():
    if _TORCHLIB_OPS in sys.modules:
        register_dynamo_translations()
    elif importlib.util.find_spec("onnxscript") is not None:
        sys.meta_path.insert(0, _AfterTorchlibImport())


_register_legacy()
_register_dynamo_on_import()
__all__ = ["custom_translation_table", "export", "gate_rows", "register_dynamo_translations"]
