"""seqfast.nn.LSTMCell / GRUCell / RNNCell against torch.nn's cells."""

import pytest
import torch

import seqfast.nn
from conftest import DTYPES, dtype_id, tolerance

CELLS = ["LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu"]
INPUT_SIZE, HIDDEN_SIZE, BATCH = 5, 7, 3


def make_cell_pair(cell, dtype, bias=True, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE):
    kw = dict(bias=bias)
    name = cell
    if cell.startswith("RNNCell"):
        name, kw["nonlinearity"] = cell.split("_")
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(input_size, hidden_size, **kw).to(dtype)
    sf = getattr(seqfast.nn, name)(input_size, hidden_size, **kw).to(dtype)
    assert isinstance(sf, getattr(torch.nn, name))
    assert type(sf) is not getattr(torch.nn, name), "seqfast cell must be its own subclass"
    sf.load_state_dict(ref.state_dict(), strict=True)
    return ref, sf


def _run_cell(cell, m, x0, hx0, gen_seed=3):
    x = x0.clone().requires_grad_(True)
    leaves = {"input": x}
    if hx0 is None:
        out = m(x)
    elif cell == "LSTMCell":
        h, c = (t.clone().requires_grad_(True) for t in hx0)
        leaves.update(h0=h, c0=c)
        out = m(x, (h, c))
    else:
        h = hx0.clone().requires_grad_(True)
        leaves["h0"] = h
        out = m(x, h)
    outs = list(out) if cell == "LSTMCell" else [out]
    g = torch.Generator().manual_seed(gen_seed)
    gos = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    named = {**leaves, **dict(m.named_parameters())}
    grads = torch.autograd.grad(outs, list(named.values()), gos, allow_unused=True)
    return [o.detach() for o in outs], dict(zip(named, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["2d", "1d"])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_matches_torch(cell, batched, with_hx, bias, dtype):
    ref, sf = make_cell_pair(cell, dtype, bias)
    g = torch.Generator().manual_seed(1)
    lead = (BATCH,) if batched else ()
    x0 = torch.randn(lead + (INPUT_SIZE,), generator=g, dtype=torch.float64).to(dtype)
    hx0 = None
    if with_hx:
        h = torch.randn(lead + (HIDDEN_SIZE,), generator=g, dtype=torch.float64).to(dtype)
        c = torch.randn(lead + (HIDDEN_SIZE,), generator=g, dtype=torch.float64).to(dtype)
        hx0 = (h, c) if cell == "LSTMCell" else h
    o_ref, g_ref = _run_cell(cell, ref, x0, hx0)
    o_sf, g_sf = _run_cell(cell, sf, x0, hx0)
    tol = tolerance(dtype)
    assert len(o_sf) == len(o_ref)
    for a, b in zip(o_sf, o_ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    assert set(g_sf) == set(g_ref)
    for n, gr in g_ref.items():
        assert gr is not None, f"torch gave no grad for {n} (test bug)"
        assert g_sf[n] is not None, f"seqfast gave no grad for {n}"
        torch.testing.assert_close(g_sf[n], gr, **tol, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_cell_unrolled_sequence(cell):
    """A cell applied over a few steps (state carried between calls) still matches, gradients included."""
    dtype = torch.float64
    ref, sf = make_cell_pair(cell, dtype)
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(5, BATCH, INPUT_SIZE, generator=g, dtype=dtype)

    def run(m):
        x = xs.clone().requires_grad_(True)
        state = None
        outs = []
        for t in range(xs.size(0)):
            state = m(x[t]) if state is None else m(x[t], state)
            outs.append(state[0] if cell == "LSTMCell" else state)
        y = torch.stack(outs)
        gen = torch.Generator().manual_seed(9)
        go = torch.randn(y.shape, generator=gen, dtype=dtype)
        params = [p for _, p in m.named_parameters()]
        grads = torch.autograd.grad([y], [x] + params, [go])
        return y.detach(), grads

    y_ref, g_ref = run(ref)
    y_sf, g_sf = run(sf)
    tol = tolerance(dtype)
    torch.testing.assert_close(y_sf, y_ref, **tol)
    for a, b in zip(g_sf, g_ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_seeded_construction_and_repr(cell):
    name, kw = cell, {}
    if cell.startswith("RNNCell"):
        name, kw["nonlinearity"] = cell.split("_")
    torch.manual_seed(42)
    ref = getattr(torch.nn, name)(INPUT_SIZE, HIDDEN_SIZE, **kw)
    torch.manual_seed(42)
    sf = getattr(seqfast.nn, name)(INPUT_SIZE, HIDDEN_SIZE, **kw)
    assert [n for n, _ in sf.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), (_, b) in zip(sf.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert repr(sf) == repr(ref)
