"""torch.compile(fullgraph=True) and torch.export on models built from seqfast modules.

CI has two cores: keep the number of compilations small (each test compiles once).
"""

import pytest
import torch

import seqfast.nn

# float64 keeps the comparison tight; inductor's generated code for the surrounding Linear layers is
# allowed ordinary float64 rounding differences.
TOL = dict(atol=1e-9, rtol=1e-7)


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = seqfast.nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = seqfast.nn.GRU(12, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, hg = self.gru(y.transpose(0, 1))
        return self.head(torch.tanh(z)).sum(0) + h.sum(0).sum(-1, keepdim=True) + c.mean() + hg.sum(0).sum(-1, keepdim=True)


def _clone_model(m):
    other = Encoder().double()
    other.load_state_dict(m.state_dict())
    return other


def _run(model, x, params_of=None):
    """Forward+backward; gradients read from ``params_of`` (the eager module under a compiled wrapper)."""
    params_of = params_of or model
    x = x.clone().requires_grad_(True)
    out = model(x)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    grads = {n: p.grad.clone() for n, p in params_of.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _assert_same(eager, compiled):
    out_e, gx_e, g_e = eager
    out_c, gx_c, g_c = compiled
    torch.testing.assert_close(out_c, out_e, **TOL)
    torch.testing.assert_close(gx_c, gx_e, **TOL)
    assert set(g_c) == set(g_e)
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Encoder().double()
    model_c = _clone_model(model)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    eager = _run(model, x)
    compiled_model = torch.compile(model_c, backend=backend, fullgraph=True)
    _assert_same(eager, _run(compiled_model, x, model_c))
    # a second call with new data reuses the graph and is still right
    x2 = torch.randn(3, 7, 5, dtype=torch.float64)
    model.zero_grad()
    model_c.zero_grad()
    _assert_same(_run(model, x2), _run(compiled_model, x2, model_c))


def test_compile_counts_no_graph_breaks():
    """fullgraph=True would raise on a graph break; also check the ops appear in the captured graph
    (i.e. dynamo traced through seqfast instead of falling back)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Encoder().double()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(3, 7, 5, dtype=torch.float64))
    assert len(graphs) == 1
    code = graphs[0].code
    assert "seqfast" in code, "the seqfast ops are not in the captured graph"
    assert "_VF" not in code and "aten.lstm" not in code


class ExportModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = seqfast.nn.LSTM(5, 6, num_layers=2, proj_size=3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))
        return self.head(y), h, c


def test_export():
    torch.manual_seed(0)
    model = ExportModel().eval()
    args = (torch.randn(7, 3, 5), torch.randn(2, 3, 3), torch.randn(2, 3, 6))
    ep = torch.export.export(model, args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("seqfast" in t for t in targets), targets
    with torch.no_grad():
        expected = model(*args)
        got = ep.module()(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    args2 = (torch.randn(7, 3, 5), torch.randn(2, 3, 3), torch.randn(2, 3, 6))
    with torch.no_grad():
        for a, b in zip(ep.module()(*args2), model(*args2)):
            torch.testing.assert_close(a, b)
