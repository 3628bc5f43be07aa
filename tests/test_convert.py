"""seqfast.convert, state_dict compatibility, seeded construction, repr, class hierarchy."""

import copy

import pytest
import torch

import seqfast
import seqfast.nn

PAIRS = [
    (torch.nn.LSTM, seqfast.nn.LSTM),
    (torch.nn.GRU, seqfast.nn.GRU),
    (torch.nn.RNN, seqfast.nn.RNN),
    (torch.nn.LSTMCell, seqfast.nn.LSTMCell),
    (torch.nn.GRUCell, seqfast.nn.GRUCell),
    (torch.nn.RNNCell, seqfast.nn.RNNCell),
]
TORCH_TO_SEQFAST = dict(PAIRS)


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = torch.nn.Sequential(
            torch.nn.Linear(4, 5),
            torch.nn.Tanh(),
        )
        self.lstm = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3)
        self.cell = torch.nn.GRUCell(6, 4)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.seq = torch.nn.Sequential(
            torch.nn.GRU(6, 5, dropout=0.0, num_layers=2),
            torch.nn.RNN(5, 4, nonlinearity="relu", bias=False),
        )
        self.lstm_cell = torch.nn.LSTMCell(4, 3)
        self.rnn_cells = torch.nn.ModuleList([torch.nn.RNNCell(3, 3, nonlinearity="tanh")])

    def forward(self, x):  # x: (B, T, 4)
        y = self.inner.stack(x)
        y, (h, c) = self.inner.lstm(y)  # (B, T, 6)
        y = y.transpose(0, 1)  # (T, B, 6)
        y, hg = self.seq[0](y)
        y, hr = self.seq[1](y)
        g = self.inner.cell(y[0] @ torch.ones(4, 6, dtype=y.dtype), None)
        hc, cc = self.lstm_cell(y[-1])
        r = self.rnn_cells[0](hc)
        return torch.cat([y.sum(0), g, hc, cc, r, h.sum(0), c.sum(0), hg.sum(0), hr.sum(0)], -1)


def _named_recurrent(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.RNNBase, torch.nn.RNNCellBase))]


def test_convert_nested_model():
    torch.manual_seed(0)
    model = Model().double()
    model.eval()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    values_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    originals = {n: (type(m), repr(m), m.training) for n, m in _named_recurrent(model)}
    assert len(originals) == 6

    result = seqfast.convert(model)
    assert result is model

    converted = dict(_named_recurrent(model))
    assert set(converted) == set(originals)
    for name, (cls, rep, training) in originals.items():
        m = converted[name]
        assert type(m) is TORCH_TO_SEQFAST[cls], f"{name}: {type(m)}"
        assert repr(m) == rep, name
        assert m.training == training, name
    # parameters kept: same names, same values, same dtype, still trainable
    after = dict(model.named_parameters())
    assert list(after) == list(params_before)
    for n, p in after.items():
        assert isinstance(p, torch.nn.Parameter), n
        assert p.dtype == torch.float64 and p.requires_grad, n
        assert torch.equal(p, values_before[n]), n
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-8)
    # the converted model trains: gradients reach every parameter
    model.train()
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n


def test_convert_keeps_optimizer_working():
    """Parameters must be the same objects, or an optimizer built before convert() would update
    tensors the model no longer uses. (If seqfast chooses to copy, this documents that it must not.)"""
    torch.manual_seed(0)
    model = Model()
    params_before = list(model.parameters())
    seqfast.convert(model)
    params_after = list(model.parameters())
    assert len(params_before) == len(params_after)
    assert all(a is b for a, b in zip(params_before, params_after))


@pytest.mark.parametrize("torch_cls,kw", [
    (torch.nn.LSTM, dict(num_layers=2, proj_size=2)),
    (torch.nn.GRU, dict(bidirectional=True)),
    (torch.nn.RNN, dict(nonlinearity="relu")),
    (torch.nn.LSTMCell, {}),
    (torch.nn.GRUCell, dict(bias=False)),
    (torch.nn.RNNCell, dict(nonlinearity="relu")),
], ids=lambda v: getattr(v, "__name__", ""))
def test_convert_top_level_module(torch_cls, kw):
    torch.manual_seed(0)
    m = torch_cls(4, 5, **kw)
    state = copy.deepcopy(m.state_dict())
    new = seqfast.convert(m)
    assert type(new) is TORCH_TO_SEQFAST[torch_cls]
    assert repr(new) == repr(torch_cls(4, 5, **kw))
    sd = new.state_dict()
    assert list(sd) == list(state)
    for k in state:
        assert torch.equal(sd[k], state[k]), k
    # the converted module works
    x = torch.randn(3, 2, 4) if issubclass(torch_cls, torch.nn.RNNBase) else torch.randn(2, 4)
    out = new(x)
    ref = torch_cls(4, 5, **kw)
    ref.load_state_dict(state)
    out_ref = ref(x)
    for a, b in zip(_flatten(out), _flatten(out_ref), strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def _flatten(o):
    if isinstance(o, (tuple, list)):
        return [t for item in o for t in _flatten(item)]
    return [o]


def test_convert_is_idempotent_and_leaves_other_modules_alone():
    torch.manual_seed(0)
    model = Model()
    linear = model.inner.stack[0]
    seqfast.convert(model)
    first = {n: m for n, m in model.named_modules()}
    seqfast.convert(model)
    second = {n: m for n, m in model.named_modules()}
    assert list(first) == list(second)
    for n in first:
        assert first[n] is second[n], n
    assert model.inner.stack[0] is linear and type(linear) is torch.nn.Linear


def test_convert_module_without_recurrent_layers():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert seqfast.convert(m) is m
    assert type(m[0]) is torch.nn.Linear


def test_convert_keeps_changed_attributes():
    """dropout changed after construction, and a module moved to float64, stay that way."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.GRU(4, 5, num_layers=3, dropout=0.2)).double()
    m[0].dropout = 0.6
    m.eval()
    seqfast.convert(m)
    assert type(m[0]) is seqfast.nn.GRU
    assert m[0].dropout == 0.6 and not m[0].training
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m[0](torch.randn(2, 1, 4, dtype=torch.float64))[0].dtype == torch.float64


# ---------------------------------------------------------------------------------------------------
# state_dict round trip, class hierarchy, repr, seeded construction
# ---------------------------------------------------------------------------------------------------
CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(num_layers=3, proj_size=2, bias=False)),
    ("LSTM", dict(batch_first=True, dropout=0.25, num_layers=2)),
    ("GRU", dict(num_layers=2, bidirectional=True, bias=False)),
    ("GRU", dict(batch_first=True)),
    ("RNN", dict(nonlinearity="relu", num_layers=3, bidirectional=True)),
    ("RNN", dict(nonlinearity="tanh", bias=False, dropout=0.5, num_layers=2)),
]
CONFIG_IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CONFIGS)]


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_round_trip(kind, kw):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(4, 5, **kw)
    sf = getattr(seqfast.nn, kind)(4, 5, **kw)
    assert list(sf.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert sf.state_dict()[k].shape == v.shape, k
    # torch -> seqfast
    result = sf.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in ref.state_dict().items():
        assert torch.equal(sf.state_dict()[k], v), k
    # seqfast -> torch
    with torch.no_grad():
        for p in sf.parameters():
            p.add_(1.0)
    ref2 = getattr(torch.nn, kind)(4, 5, **kw)
    ref2.load_state_dict(sf.state_dict(), strict=True)
    for k, v in sf.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v), k
    # the loaded weights are the ones used in forward
    x = torch.randn(3, 2, 4)
    ref2.eval()
    sf.eval()
    with torch.no_grad():
        torch.testing.assert_close(sf(x)[0], ref2(x)[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=CONFIG_IDS)
def test_class_hierarchy_and_repr(kind, kw):
    ref = getattr(torch.nn, kind)(4, 5, **kw)
    sf = getattr(seqfast.nn, kind)(4, 5, **kw)
    assert isinstance(sf, torch.nn.RNNBase)
    # not a subclass of torch.nn.LSTM/GRU/RNN: dynamo refuses those (see test_compile.py)
    assert not isinstance(sf, (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN))
    assert type(sf).__name__ == kind
    assert repr(sf) == repr(ref)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(sf, attr) == getattr(ref, attr), attr
    assert sf._flat_weights_names == ref._flat_weights_names
    assert [[n for n in names] for names in sf._all_weights] == ref._all_weights
    assert [p.shape for p in sf.all_weights[0]] == [p.shape for p in ref.all_weights[0]]
    if kind == "RNN":
        assert sf.nonlinearity == ref.nonlinearity


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=CONFIG_IDS)
def test_seeded_construction_matches_torch(kind, kw):
    torch.manual_seed(1234)
    ref = getattr(torch.nn, kind)(4, 5, **kw)
    torch.manual_seed(1234)
    sf = getattr(seqfast.nn, kind)(4, 5, **kw)
    assert [n for n, _ in sf.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), (_, b) in zip(sf.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    # and the generator is left in the same state (no extra random draws)
    after_sf = torch.rand(3)
    torch.manual_seed(1234)
    getattr(torch.nn, kind)(4, 5, **kw)
    assert torch.equal(after_sf, torch.rand(3))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_positional_constructor_arguments(kind):
    """torch.nn accepts all constructor arguments positionally (and RNN's nonlinearity as the 4th)."""
    args = (4, 5, 2, False, True, 0.0, True) if kind != "RNN" else (4, 5, 2, "relu", False, True, 0.0, True)
    ref = getattr(torch.nn, kind)(*args)
    sf = getattr(seqfast.nn, kind)(*args)
    assert repr(sf) == repr(ref)
    sf.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_to_dtype_and_deepcopy(kind):
    torch.manual_seed(0)
    sf = getattr(seqfast.nn, kind)(4, 5, num_layers=2)
    ref = getattr(torch.nn, kind)(4, 5, num_layers=2)
    ref.load_state_dict(sf.state_dict())
    sf64, ref64 = copy.deepcopy(sf).double(), copy.deepcopy(ref).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sf64(x)[0], ref64(x)[0], atol=1e-10, rtol=1e-8)
        # the original is untouched by the copy's conversion
        torch.testing.assert_close(sf(x.float())[0], ref(x.float())[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_functional_call_uses_given_parameters(kind):
    """torch.func.functional_call swaps parameters; the seqfast module must read the swapped ones."""
    torch.manual_seed(0)
    sf = getattr(seqfast.nn, kind)(4, 5)
    ref = getattr(torch.nn, kind)(4, 5)
    ref.load_state_dict(sf.state_dict())
    new_params = {n: torch.randn_like(p) for n, p in sf.named_parameters()}
    x = torch.randn(3, 2, 4)
    got = torch.func.functional_call(sf, new_params, (x,))[0]
    want = torch.func.functional_call(ref, new_params, (x,))[0]
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
