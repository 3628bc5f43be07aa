"""seqfast::cell_forward, the eager one-step op behind seqfast.nn's cells (csrc/cpu/cell_step_kernel.cpp,
its autograd kernel in csrc/autograd.cpp): without a graph it runs a tiny-step kernel (or the layer op
above kCellMacs); with one it records the layer op's node. Both must match torch.nn."""

import pytest
import torch

import seqfast.nn
from conftest import DTYPES, dtype_id, tolerance
from test_cells import CELLS, make_cell_pair

CELL_FORWARD = torch.ops.seqfast.cell_forward.default
MODE = {"LSTMCell": 0, "GRUCell": 1, "RNNCell_tanh": 2, "RNNCell_relu": 3}

# (batch, input, hidden): the tiny-step kernel at the first two (a hidden size that is not a multiple
# of the 4-row dot blocks, and the benchmark's B=1 I=H=16), the layer op's GEMMs at the last (its
# multiply-adds exceed the kernel's limit).
SIZES = [(3, 5, 7), (1, 16, 16), (16, 40, 80)]


def _states(cell, lead, hidden, dtype, g):
    h = torch.randn(lead + (hidden,), generator=g, dtype=torch.float64).to(dtype)
    if cell == "LSTMCell":
        return h, torch.randn(lead + (hidden,), generator=g, dtype=torch.float64).to(dtype)
    return h


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["2d", "1d"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", CELLS)
def test_cell_inference_matches_torch(cell, size, batched, with_hx, bias, dtype):
    batch, input_size, hidden = size
    ref, sf = make_cell_pair(cell, dtype, bias, input_size=input_size, hidden_size=hidden)
    g = torch.Generator().manual_seed(1)
    lead = (batch,) if batched else ()
    x = torch.randn(lead + (input_size,), generator=g, dtype=torch.float64).to(dtype)
    hx = _states(cell, lead, hidden, dtype, g) if with_hx else None
    with torch.no_grad():
        expected, got = ref(x, hx), sf(x, hx)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and not a.requires_grad
        torch.testing.assert_close(a, b, **tolerance(dtype))


@pytest.mark.parametrize("cell", CELLS)
def test_cell_inference_state_carried(cell):
    """A decoding loop (the state fed back every step) stays on torch's trajectory."""
    ref, sf = make_cell_pair(cell, torch.float32, input_size=16, hidden_size=16)
    xs = torch.randn(20, 1, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s_ref = s_sf = None
        for x in xs:
            s_ref, s_sf = ref(x, s_ref), sf(x, s_sf)
    for a, b in zip(s_sf if isinstance(s_sf, tuple) else (s_sf,), s_ref if isinstance(s_ref, tuple) else (s_ref,)):
        torch.testing.assert_close(a, b, **tolerance(torch.float32))


def _op_args(cell, dtype, batch=2, input_size=5, hidden=7, bias=True, requires_grad=False):
    ref, _ = make_cell_pair(cell, dtype, bias, input_size=input_size, hidden_size=hidden)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, input_size, generator=g, dtype=dtype)
    h = torch.randn(batch, hidden, generator=g, dtype=dtype)
    c = torch.randn(batch, hidden, generator=g, dtype=dtype) if cell == "LSTMCell" else None
    w = [p.detach().clone().requires_grad_(requires_grad) if p is not None else None
         for p in (ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh)]
    return ref, (x, h, c, *w, MODE[cell])


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_forward_opcheck(cell, requires_grad):
    _, args = _op_args(cell, torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(CELL_FORWARD, args)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_forward_grad_path_records_layer_node(cell):
    """With a graph to record, the op is the layer op at T = 1: its gradients are torch's."""
    ref, args = _op_args(cell, torch.float64, requires_grad=True)
    hy, _ = CELL_FORWARD(*args)
    assert hy.grad_fn is not None
    weights = [a for a in args[3:7] if a is not None]
    grads = torch.autograd.grad(hy.sum(), weights)
    x, h, c = args[:3]
    expected = ref(x, (h, c) if c is not None else h)
    expected = expected[0] if isinstance(expected, tuple) else expected
    ref_grads = torch.autograd.grad(expected.sum(), [p for p in ref.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


@pytest.mark.parametrize("cell", CELLS)
def test_cell_forward_non_contiguous_and_mixed_layouts(cell):
    """Arguments the tiny-step kernel does not take directly (a transposed weight, a strided input) go to
    the layer op, which handles them; the result is still torch's."""
    ref, (x, h, c, w_ih, w_hh, b_ih, b_hh, mode) = _op_args(cell, torch.float64)
    w_hh_t = w_hh.t().contiguous().t()  # same values, column-major
    x_strided = torch.cat([x, x], 1)[:, ::2]
    x_strided.copy_(x)
    with torch.no_grad():
        hy, _ = CELL_FORWARD(x_strided, h, c, w_ih, w_hh_t, b_ih, b_hh, mode)
        expected = ref(x, (h, c) if c is not None else h)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(hy, expected, **tolerance(torch.float64))


@pytest.mark.parametrize(
    "case",
    ["wrong_w_ih", "wrong_w_hh", "wrong_bias", "wrong_hx_batch", "float_weights_double_input",
     "missing_cx", "bad_mode", "input_3d"],
)
def test_cell_forward_bad_arguments_raise(case):
    """Malformed raw-op calls raise a RuntimeError (never crash), from the kernel or the layer op."""
    _, (x, h, c, w_ih, w_hh, b_ih, b_hh, mode) = _op_args("LSTMCell", torch.float64)
    args = dict(input=x, hx=h, cx=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, mode=mode)
    if case == "wrong_w_ih":
        args["w_ih"] = w_ih[:, :-1].contiguous()
    elif case == "wrong_w_hh":
        args["w_hh"] = w_hh[:-4].contiguous()
    elif case == "wrong_bias":
        args["b_ih"] = b_ih[:-1].contiguous()
    elif case == "wrong_hx_batch":
        args["hx"] = h[:1].contiguous()
    elif case == "float_weights_double_input":
        args["w_ih"] = w_ih.float()
    elif case == "missing_cx":
        args["cx"] = None
    elif case == "bad_mode":
        args["mode"] = 7
    elif case == "input_3d":
        args["input"] = x.unsqueeze(0)
    with torch.no_grad(), pytest.raises(RuntimeError):
        CELL_FORWARD(**args)


def test_cells_keep_the_layer_op_under_tracing():
    """torch.jit.trace (and so ONNX export) must record recurrent_layer_forward, which seqfast/onnx.py
    maps, not cell_forward."""
    cell = seqfast.nn.LSTMCell(4, 6)
    x, state = torch.randn(2, 4), (torch.randn(2, 6), torch.randn(2, 6))
    with torch.no_grad():
        traced = torch.jit.trace(cell, (x, state))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "seqfast::recurrent_layer_forward" in kinds and "seqfast::cell_forward" not in kinds
    with torch.no_grad():
        torch.testing.assert_close(traced(x, state), cell(x, state))


# ---------------------------------------------------------------------------------------------------
# seqfast::cell_backward: the layer backward node's path for one unpacked CPU step.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", CELLS)
def test_cell_training_matches_torch(cell, size, dtype):
    """Outputs and every gradient (input, states, parameters), at the tiny-kernel sizes and at the size
    handed back to the layer backward op."""
    from test_cells import _run_cell

    batch, input_size, hidden = size
    ref, sf = make_cell_pair(cell, dtype, input_size=input_size, hidden_size=hidden)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(batch, input_size, generator=g, dtype=torch.float64).to(dtype)
    hx0 = _states(cell, (batch,), hidden, dtype, g)
    o_ref, g_ref = _run_cell(cell, ref, x0, hx0)
    o_sf, g_sf = _run_cell(cell, sf, x0, hx0)
    for a, b in zip(o_sf, o_ref):
        torch.testing.assert_close(a, b, **tolerance(dtype))
    for name, expected in g_ref.items():
        torch.testing.assert_close(g_sf[name], expected, **tolerance(dtype), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_cell_training_with_expanded_gradient(cell):
    """`out.sum().backward()` hands the node a stride-0 gradient; the kernel must read it correctly."""
    ref, sf = make_cell_pair(cell, torch.float64, input_size=16, hidden_size=16)
    x = torch.randn(1, 16, dtype=torch.float64)
    for m in (ref, sf):
        out = m(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    for (name, a), b in zip(sf.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tolerance(torch.float64), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "no_input_grad"])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_backward_opcheck(cell, input_grad):
    _, (x, h, c, w_ih, w_hh, b_ih, b_hh, mode) = _op_args(cell, torch.float64)
    output, _, _, workspace = torch.ops.seqfast.recurrent_layer_forward(
        x.unsqueeze(0), None, h, c, w_ih, w_hh, b_ih, b_hh, None, mode, False, True)
    g = torch.Generator().manual_seed(6)
    grad_output = torch.randn(output.shape, generator=g, dtype=output.dtype)
    grad_hy = torch.randn(h.shape, generator=g, dtype=h.dtype)
    grad_cy = torch.randn(h.shape, generator=g, dtype=h.dtype) if c is not None else None
    args = (grad_output, grad_hy, grad_cy, x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh, output, workspace,
            mode, input_grad)
    torch.library.opcheck(torch.ops.seqfast.cell_backward.default, args)
    # The same numbers as the layer backward op it stands in for.
    got = torch.ops.seqfast.cell_backward(*args)
    expected = torch.ops.seqfast.recurrent_layer_backward(
        grad_output, grad_hy, grad_cy, x.unsqueeze(0), None, h, c, w_ih, w_hh, b_ih, b_hh, None, output,
        workspace, mode, False, input_grad)
    for a, b in zip(got, expected[:7]):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))
