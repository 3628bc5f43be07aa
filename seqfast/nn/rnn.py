"""Drop-in replacements for torch.nn.LSTM / GRU / RNN and the three cells.

The layers subclass torch.nn.RNNBase, as torch's own do, so parameters, state_dict keys,
`_flat_weights`, `reset_parameters` and `repr` are torch's. They deliberately do NOT subclass
torch.nn.LSTM/GRU/RNN: dynamo refuses to trace instances of those three classes, and seqfast layers
are meant to work under torch.compile(fullgraph=True). Argument checking reuses torch's own methods,
so errors carry torch's exact types and messages.

float32/float64/bfloat16 inputs on the CPU, and float32/float64/float16/bfloat16 inputs on CUDA when
this build has the CUDA kernels, run the fused kernels (one op call per layer and direction, the time
loop in C++); so does float32 under torch.autocast("cpu", dtype=torch.bfloat16) (the op's AutocastCPU
kernel, csrc/cpu/recurrent_layer_autocast.cpp, decides the dtypes). Anything else (float16 on the CPU,
also under float16 autocast; other devices) is delegated to torch's own implementation (torch._VF),
documented in the README.
"""
import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from .. import ops

# The CPU kernels take bfloat16 with float32 gates and cell state (csrc/cpu/recurrent_layer_kernel.cpp).
_FUSED_DTYPES_CPU = (torch.float32, torch.float64, torch.bfloat16)
# The CUDA kernels also take float16 (float32 accumulation; csrc/cuda/recurrent_layer_cuda.h).
_FUSED_DTYPES_CUDA = _FUSED_DTYPES_CPU + (torch.float16,)


def _cpu_autocast_dtype():
    """The dtype of an enclosing torch.autocast("cpu") region, or None outside one."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _has_fused_kernel(t: torch.Tensor) -> bool:
    if t.is_cpu:  # (not t.device.type: building the device object is ~0.2 us of a ~6 us cell step)
        # float16 autocast on the CPU: no fused float16 kernel here; torch's own path gives torch's
        # results and dtypes (and its errors: torch's unpacked LSTM fails in oneDNN there).
        return t.dtype in _FUSED_DTYPES_CPU and (
            not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.float16)
    if t.dtype not in (_FUSED_DTYPES_CUDA if t.device.type == "cuda" else _FUSED_DTYPES_CPU):
        return False
    # The dispatch key of a device type is not its upper-cased name ("meta" -> "Meta").
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "seqfast::recurrent_layer_forward", torch._C._dispatch_key_for_device(t.device.type))


def _needs_grad(tensors) -> bool:
    # Under torch.jit.trace the answer would become a constant of the graph, fixed by the grad mode at
    # trace time (and trace's own check re-runs under no_grad); record False instead: the op's
    # autograd kernel saves the workspace whenever it records a node for the backward.
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and not torch.jit.is_tracing())


# Read once: torch.compile refuses to trace torch.backends.mkldnn.is_available() (a skipped function).
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def _torch_lstm_runs_onednn_bf16(input) -> bool:
    """Whether torch.nn.LSTM would run oneDNN's RNN primitive in bfloat16 on this unpacked input
    without projections: under bfloat16 CPU autocast with oneDNN built in and enabled (the condition
    of ATen's use_mkldnn, which looks at the float32 input autocast has not cast yet)."""
    return (_cpu_autocast_dtype() == torch.bfloat16 and input.device.type == "cpu"
            and input.dtype in (torch.float32, torch.bfloat16) and input.numel() > 0
            and _HAS_ONEDNN and torch.backends.mkldnn.enabled)


class _FusedRNNBase(nn.RNNBase):
    """Shared forward of LSTM, GRU and RNN; `mode` is torch's string ('LSTM', 'GRU', 'RNN_TANH'...)."""

    def _layer_weights(self, index):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of flat layer-direction `index`, None where absent."""
        per = len(self._flat_weights) // (self.num_layers * (2 if self.bidirectional else 1))
        group = self._flat_weights[index * per:(index + 1) * per]
        w_ih, w_hh = group[0], group[1]
        b_ih, b_hh = (group[2], group[3]) if self.bias else (None, None)
        w_hr = group[-1] if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _run_fused(self, input, batch_sizes, h0, c0):
        """input: (T, B, I) time-major, or packed data (N, I). Returns output, h_n, c_n (or None)."""
        mode = ops.MODES[self.mode]
        directions = 2 if self.bidirectional else 1
        training = _needs_grad([input, h0, c0, *self._flat_weights])
        layer_input = input
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                output, hy, cy = ops.recurrent_layer(
                    layer_input, batch_sizes, h0[index], c0[index] if c0 is not None else None,
                    *self._layer_weights(index), mode, direction == 1, training)
                outputs.append(output)
                h_n.append(hy)
                c_n.append(cy)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        if len(h_n) == 1:  # one layer, one direction: a view, not a copy (torch.stack: ~2 us each)
            return layer_input, h_n[0].unsqueeze(0), c_n[0].unsqueeze(0) if c0 is not None else None
        return layer_input, torch.stack(h_n), torch.stack(c_n) if c0 is not None else None

    def _run_torch(self, input, batch_sizes, hx):
        """torch's own implementation, for dtypes/devices without a fused kernel."""
        fn = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[self.mode]
        if batch_sizes is None:
            result = fn(input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout,
                        self.training, self.bidirectional, self.batch_first)
        else:
            result = fn(input, batch_sizes, hx, self._flat_weights, self.bias, self.num_layers,
                        self.dropout, self.training, self.bidirectional)
        return (result[0], result[1:]) if self.mode == "LSTM" else (result[0], result[1])

    def _run(self, input, batch_sizes, hx):
        """Dispatch between the fused kernels and torch; returns (output, hidden) like torch's _VF."""
        is_lstm = self.mode == "LSTM"
        if not _has_fused_kernel(input) or ops.torch_implementation_needed():
            return self._run_torch(input, batch_sizes, hx)
        h0, c0 = hx if is_lstm else (hx, None)
        if is_lstm and batch_sizes is None and self.proj_size == 0 and _torch_lstm_runs_onednn_bf16(input):
            # torch.nn.LSTM runs this case as one oneDNN RNN primitive, which autocast casts to
            # bfloat16 as a whole: output, h_n and c_n come back bfloat16. bfloat16 states make the
            # op's autocast kernel return the same (the cell state stays float32 inside the kernel).
            h0, c0 = h0.to(torch.bfloat16), c0.to(torch.bfloat16)
        time_major = batch_sizes is None and self.batch_first
        if time_major:
            input = input.transpose(0, 1)
        output, h_n, c_n = self._run_fused(input, batch_sizes, h0, c0)
        if time_major:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if is_lstm else h_n)

    def _update_flat_weights(self):
        # torch's version reads each weight through Module.__getattr__ (hasattr + getattr: ~4 us a
        # call for a one-layer LSTM, 2.5% of a seed-stock forward). Same test on the _parameters dict;
        # anything unusual (a parametrization, a replaced or missing weight) takes torch's path.
        params = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            weight = params.get(name)
            if weight is None or ref is None or ref() is not weight:
                return super()._update_flat_weights()
        return None

    def _zeros_hidden(self, input, max_batch_size):
        directions = 2 if self.bidirectional else 1
        state = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = torch.zeros(self.num_layers * directions, max_batch_size, state, dtype=input.dtype,
                        device=input.device)
        if self.mode != "LSTM":
            return h
        c = torch.zeros(self.num_layers * directions, max_batch_size, self.hidden_size,
                        dtype=input.dtype, device=input.device)
        return h, c

    def forward(self, input, hx=None):
        self._update_flat_weights()
        is_lstm = self.mode == "LSTM"
        name = {"LSTM": "LSTM", "GRU": "GRU"}.get(self.mode, "RNN")
        orig_input = input
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is None:
                hx = self._zeros_hidden(input, batch_sizes[0])
            elif is_lstm:
                # torch's LSTM skips this check for packed input and fails deeper down; check first.
                self.check_forward_args(input, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                what = "tensor " if name == "RNN" else ""
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D {what}instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is None:
                hx = self._zeros_hidden(input, input.size(batch_dim))
            elif is_lstm:
                want = 3 if is_batched else 2
                if hx[0].dim() != want or hx[1].dim() != want:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {want}-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            else:
                if is_batched and hx.dim() != 3:
                    raise RuntimeError(
                        f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
                if not is_batched:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
        self.check_forward_args(input, hx, batch_sizes)

        output, hidden = self._run(input, batch_sizes, hx)

        if isinstance(orig_input, PackedSequence):
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if is_lstm else hidden.squeeze(1)
        return output, hidden


class LSTM(_FusedRNNBase):
    """Drop-in for torch.nn.LSTM (same arguments, parameters, outputs and errors), with fused kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own hidden-state checks (hidden[0]/hidden[1] messages) and permutation.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_FusedRNNBase):
    """Drop-in for torch.nn.GRU, with fused kernels."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class RNN(_FusedRNNBase):
    """Drop-in for torch.nn.RNN (tanh or relu), with fused kernels."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Cells: one time step of the same fused layer kernel (T = 1).

def _check_cell_input(input, hidden_states, input_size, hidden_size):
    """The checks torch's C++ cells make (ATen/native/RNN.cpp), with the same messages (and, through
    size(), the same IndexError for a 1-D state)."""
    batch, width = input.shape  # 2-D here (the cells unsqueeze 1-D input); a tuple: no size() calls
    if width != input_size:
        raise RuntimeError(
            f"input has inconsistent input_size: got {width} expected {input_size}")
    for label, h in enumerate(hidden_states):
        shape = h.shape
        if len(shape) == 2 and shape[0] == batch and shape[1] == hidden_size:
            continue
        if batch != h.size(0):
            raise RuntimeError(
                f"Input batch size {batch} doesn't match hidden{label} batch size {h.size(0)}")
        if h.size(1) != hidden_size:
            raise RuntimeError(
                f"hidden{label} has inconsistent hidden_size: got {h.size(1)}, expected {hidden_size}")


# The cells run torch's own implementation (super().forward) where the fused kernel does not apply:
# dtypes/devices without a kernel, hidden_size=0 (an empty step: torch returns (B, 0) states and zero
# input gradients), and forward-mode AD or nested torch.func differentiation (see
# seqfast.func.torch_implementation_needed). The test is written out in each forward: a helper
# function call costs a measurable share of a ~10 us step.


def _cell_step(params, mode, input, h, c):
    """One step on batched (B, I) input; returns (hy, cy), cy empty unless LSTM.

    params: the cell's `_parameters` dict. Reading it directly instead of `cell.weight_ih` skips
    Module.__getattr__'s fallback (~0.3 us a read, four reads), and sees what torch.func.functional_call
    swaps in (it writes into that dict).

    Eager CPU calls take seqfast::cell_forward, whose C++ autograd kernel records the layer op's node
    when a graph is needed and otherwise runs a tiny-step kernel without the layer op's allocations
    (benchmarks/NOTES.md 16). Tracing (ONNX export maps recurrent_layer_forward), torch.compile and
    torch.func transforms (which need the Python autograd.Function, seqfast/func.py) keep the layer op
    at T = 1; under autocast, cell_forward's AutocastCPU kernel is the layer op at T = 1."""
    w_ih, w_hh, b_ih, b_hh = params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
    # is_compiling first: under dynamo it is a constant True and the other two are never traced.
    if input.is_cpu and not (_compiling() or _tracing() or ops._transforms_active()):
        return ops.CELL_FORWARD(input, h, c, w_ih, w_hh, b_ih, b_hh, mode)
    training = _needs_grad((input, h, c, w_ih, w_hh, b_ih, b_hh))
    _, hy, cy = ops.recurrent_layer(input.unsqueeze(0), None, h, c, w_ih, w_hh, b_ih, b_hh, None, mode,
                                    False, training)
    return hy, cy


_tracing = torch._C._is_tracing
_compiling = torch.compiler.is_compiling
_LSTM_MODE = ops.MODES["LSTM"]


class LSTMCell(nn.LSTMCell):
    """Drop-in for torch.nn.LSTMCell, with the fused kernel."""

    def forward(self, input, hx=None):
        dim = input.dim()
        if dim != 2 and dim != 1:
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {dim}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        if not _has_fused_kernel(input) or self.hidden_size == 0 or ops.torch_implementation_needed():
            return super().forward(input, hx)
        if dim == 1:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        _check_cell_input(input, hx, self.input_size, self.hidden_size)
        hy, cy = _cell_step(self._parameters, _LSTM_MODE, input, hx[0], hx[1])
        return (hy, cy) if dim == 2 else (hy.squeeze(0), cy.squeeze(0))


class _SingleStateCell:
    """forward() shared by GRUCell and RNNCell (one hidden state)."""

    _name = ""

    def _mode(self):
        raise NotImplementedError

    def forward(self, input, hx=None):
        dim = input.dim()
        if dim != 2 and dim != 1:
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {dim}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        if not _has_fused_kernel(input) or self.hidden_size == 0 or ops.torch_implementation_needed():
            return super().forward(input, hx)
        mode = self._mode()
        if dim == 1:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = hx.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        _check_cell_input(input, (hx,), self.input_size, self.hidden_size)
        hy, _ = _cell_step(self._parameters, mode, input, hx, None)
        return hy if dim == 2 else hy.squeeze(0)


class GRUCell(_SingleStateCell, nn.GRUCell):
    """Drop-in for torch.nn.GRUCell, with the fused kernel."""

    _name = "GRUCell"

    def _mode(self):
        return ops.MODES["GRU"]


class RNNCell(_SingleStateCell, nn.RNNCell):
    """Drop-in for torch.nn.RNNCell (tanh or relu), with the fused kernel."""

    _name = "RNNCell"

    def _mode(self):
        if self.nonlinearity == "tanh":
            return ops.MODES["RNN_TANH"]
        if self.nonlinearity == "relu":
            return ops.MODES["RNN_RELU"]
        raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
