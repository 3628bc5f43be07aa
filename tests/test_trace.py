"""torch.jit.trace of every seqfast module: passes trace's own sanity check (check_trace=True, which
re-traces under no_grad and compares the graphs), equals eager, and still calls the fused ops."""
import warnings

import pytest
import torch

import seqfast

LAYERS = [
    ("LSTM", {}),
    ("LSTM", {"num_layers": 2, "bidirectional": True}),
    ("LSTM", {"batch_first": True, "bias": False}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True}),
    ("RNN", {"num_layers": 2}),
]


def _trace(module, inputs):
    with warnings.catch_warnings():
        # Attention reads the lengths into Python ints (the varlen layout): trace says it records them
        # as constants, which is what a trace of fixed shapes is.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, inputs)  # check_trace=True: the sanity check runs


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _assert_same(traced, module, inputs):
    for got, want in zip(_flat(traced(*inputs)), _flat(module(*inputs))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind,kwargs", LAYERS, ids=lambda v: str(v))
@pytest.mark.parametrize("with_hx", [False, True])
def test_trace_layer(kind, kwargs, with_hx):
    torch.manual_seed(0)
    m = getattr(seqfast.nn, kind)(5, 7, **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    x = torch.randn(4, 3, 5) if not kwargs.get("batch_first") else torch.randn(3, 4, 5)
    inputs = (x,)
    if with_hx:
        h = torch.randn(L * D, 3, 7)
        inputs = (x, (h, torch.randn(L * D, 3, 7)) if kind == "LSTM" else h)
    traced = _trace(m, inputs)
    assert "seqfast::recurrent_layer_forward" in str(traced.inlined_graph)
    _assert_same(traced, m, inputs)
    # Other values of the same shapes, with and without grad mode.
    x2 = torch.randn_like(x)
    _assert_same(traced, m, (x2, *inputs[1:]))
    with torch.no_grad():
        _assert_same(traced, m, (x2, *inputs[1:]))


def test_traced_layer_trains_like_eager():
    # The graph is recorded with training=False whatever the grad mode; the backward must still work
    # (the op's autograd kernel saves its workspace when it records a node).
    torch.manual_seed(0)
    m = seqfast.nn.LSTM(5, 7, num_layers=2)
    x = torch.randn(4, 3, 5, requires_grad=True)
    with torch.no_grad():
        traced = _trace(m, (x,))
    out, (h, c) = traced(x)
    (out.sum() + h.sum() + c.sum()).backward()
    got = [x.grad] + [p.grad for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    out, (h, c) = m(x)
    (out.sum() + h.sum() + c.sum()).backward()
    want = [x.grad] + [p.grad for p in m.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_trace_cell(kind, with_hx):
    torch.manual_seed(0)
    m = getattr(seqfast.nn, kind)(5, 7)
    x = torch.randn(3, 5)
    inputs = (x,)
    if with_hx:
        inputs = (x, (torch.randn(3, 7), torch.randn(3, 7)) if kind == "LSTMCell" else torch.randn(3, 7))
    traced = _trace(m, inputs)
    assert "seqfast::recurrent_layer_forward" in str(traced.inlined_graph)
    _assert_same(traced, m, inputs)
    _assert_same(traced, m, (torch.randn_like(x), *inputs[1:]))


@pytest.mark.parametrize("score,op", [("dot", "seqfast::attention_forward"),
                                      ("general", "seqfast::attention_forward"),
                                      ("concat", "seqfast::additive_attention_forward"),
                                      ("location", "seqfast::location_attention_forward")])
def test_trace_attention(score, op):
    torch.manual_seed(0)
    extra = {"max_memory_len": 6} if score == "location" else {}
    m = seqfast.nn.Attention(8, 8, score=score, **extra)
    query, memory = torch.randn(3, 2, 8), torch.randn(3, 6, 8)
    lengths = torch.tensor([6, 2, 4])
    traced = _trace(m, (query, memory, lengths))
    assert op in str(traced.inlined_graph)
    _assert_same(traced, m, (query, memory, lengths))
    _assert_same(traced, m, (torch.randn_like(query), torch.randn_like(memory), lengths))
