"""Meta tensors and FakeTensorMode: seqfast modules give torch.nn's shapes and dtypes without running a
kernel (shape inference, torch.compile/export tracing, big-model initialization on the meta device)."""
import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast.nn
from conftest import dtype_id, make_module_pair

T, B, I, H = 5, 3, 4, 6
LAYERS = [
    ("LSTM", {}),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("RNN_TANH", dict(bias=False)),
    ("RNN_RELU", dict(bidirectional=True)),
]
LAYER_IDS = [f"{k}-" + "-".join(f"{n}{v}" for n, v in kw.items()) for k, kw in LAYERS]
CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", dict(nonlinearity="relu"))]
INPUTS = ["padded", "unbatched", "with_hx", "packed"]


def signature(out):
    """(shape, dtype, device type) of every tensor in a module's output, and the PackedSequence fields."""
    if isinstance(out, PackedSequence):
        return ("packed", signature(out.data), tuple(out.batch_sizes.tolist()))
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.dtype, out.device.type)
    return tuple(signature(o) for o in out)


def layer_args(kind, module, how, device, dtype):
    x = torch.randn(B, T, I) if module.batch_first else torch.randn(T, B, I)
    if how == "unbatched":
        x = x[0] if module.batch_first else x[:, 0]
    if how == "packed":
        packed = pack_padded_sequence(x, [T, 2, 4], batch_first=module.batch_first, enforce_sorted=False)
        return (packed.to(device=device, dtype=dtype),)
    x = x.to(device=device, dtype=dtype)
    if how != "with_hx":
        return (x,)
    D = 2 if module.bidirectional else 1
    h = torch.zeros(module.num_layers * D, B, module.proj_size or H, device=device, dtype=dtype)
    c = torch.zeros(module.num_layers * D, B, H, device=device, dtype=dtype)
    return ((x, (h, c) if kind == "LSTM" else h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("how", INPUTS)
@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_layer_on_meta_device_matches_torch(kind, kw, how, dtype):
    ref, sf = make_module_pair(kind, I, H, torch.float32, **kw)
    want = signature(copy.deepcopy(ref).to("meta", dtype)(*layer_args(kind, ref, how, "meta", dtype)))
    got = signature(copy.deepcopy(sf).to("meta", dtype)(*layer_args(kind, sf, how, "meta", dtype)))
    assert got == want
    assert got[0][-1] == "meta" or got[0][1][-1] == "meta"


def fake_of(mode, value):
    """A fake copy of a module argument; a PackedSequence keeps its real batch_sizes (host metadata)."""
    if isinstance(value, PackedSequence):
        return PackedSequence(mode.from_tensor(value.data), value.batch_sizes, value.sorted_indices,
                              value.unsorted_indices)
    if isinstance(value, tuple):
        return tuple(fake_of(mode, v) for v in value)
    return mode.from_tensor(value)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("how", INPUTS)
@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_layer_under_fake_tensor_mode_matches_torch(kind, kw, how, train):
    ref, sf = make_module_pair(kind, I, H, torch.float32, **kw)
    if how == "packed":
        # torch.nn itself cannot: it reads batch_sizes[0] as a Python int, a data-dependent value under
        # FakeTensorMode. seqfast shares that code path and fails the same way, not differently.
        for module in (ref, sf):
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            args = tuple(fake_of(mode, a) for a in layer_args(kind, module, how, "cpu", torch.float32))
            with mode, pytest.raises(torch._subclasses.fake_tensor.DataDependentOutputException):
                module(*args)
        return
    results = []
    for module in (ref, sf):
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # the parameters stay real
        args = layer_args(kind, module, how, "cpu", torch.float32)  # packing needs real lengths
        args = tuple(fake_of(mode, a) for a in args)
        with mode:
            if train:
                args = (args[0].requires_grad_() if isinstance(args[0], torch.Tensor) else args[0], *args[1:])
            out = module(*args)
            outputs = [out[0].data if isinstance(out[0], PackedSequence) else out[0]]

            assert all(isinstance(o, FakeTensor) for o in outputs)
            if train:  # the backward's shapes too (the fake backward op)
                grads = torch.autograd.grad(outputs[0].sum(), list(module.parameters()))
                results.append((signature(out), [g.shape for g in grads]))
            else:
                results.append(signature(out))
    assert results[1] == results[0]


@pytest.mark.parametrize("name,kw", CELLS, ids=[c for c, _ in CELLS])
def test_cells_on_meta_and_fake_match_torch(name, kw):
    ref = getattr(torch.nn, name)(I, H, **kw)
    sf = getattr(seqfast.nn, name)(I, H, **kw)
    for batched in (True, False):
        shape = (B, I) if batched else (I,)
        for dtype in (torch.float32, torch.float64):
            want = signature(copy.deepcopy(ref).to("meta", dtype)(torch.randn(shape, device="meta", dtype=dtype)))
            got = signature(copy.deepcopy(sf).to("meta", dtype)(torch.randn(shape, device="meta", dtype=dtype)))
            assert got == want
        with FakeTensorMode(allow_non_fake_inputs=True):
            got = signature(sf(torch.randn(shape)))
            want = signature(ref(torch.randn(shape)))
        assert got == want


@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_construct_on_meta_then_to_empty_and_reset(kind, kw):
    """Big-model initialization: build on the meta device, materialize with to_empty, reset_parameters.
    Same seed, same draws as torch.nn doing the same: identical parameters and results."""
    from conftest import module_kwargs, seqfast_class, torch_class
    kw = module_kwargs(kind, **kw)
    modules = []
    for cls in (torch_class(kind), seqfast_class(kind)):
        with torch.device("meta"):
            m = cls(I, H, **kw)
        assert all(p.is_meta for p in m.parameters())
        m = m.to_empty(device="cpu")
        torch.manual_seed(0)
        m.reset_parameters()
        modules.append(m)
    ref, sf = modules
    for (n, a), (_, b) in zip(ref.named_parameters(), sf.named_parameters()):
        assert torch.equal(a, b), n
    x = torch.randn(B, T, I) if sf.batch_first else torch.randn(T, B, I)
    torch.testing.assert_close(sf(x)[0], ref(x)[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name,kw", CELLS, ids=[c for c, _ in CELLS])
def test_cell_construct_on_meta_then_to_empty_and_reset(name, kw):
    modules = []
    for mod in (torch.nn, seqfast.nn):
        m = getattr(mod, name)(I, H, device="meta", **kw).to_empty(device="cpu")
        torch.manual_seed(0)
        m.reset_parameters()
        modules.append(m)
    x = torch.randn(B, I)
    torch.testing.assert_close(modules[1](x), modules[0](x), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("score", ["dot", "general", "concat", "location"])
def test_attention_meta_fake_and_to_empty(score):
    kw = dict(max_memory_len=7) if score == "location" else {}
    attn = seqfast.nn.Attention(I, I, score=score, **kw)
    lengths = torch.tensor([T, 2, 4])

    def args(device):
        return torch.randn(B, 2, I, device=device), torch.randn(B, T, I, device=device)

    ctx, weights = copy.deepcopy(attn).to("meta")(*args("meta"), lengths)
    assert (ctx.shape, ctx.device.type, weights.shape) == ((B, 2, I), "meta", (B, 2, T))
    with FakeTensorMode(allow_non_fake_inputs=True):
        ctx, weights = attn(*args("cpu"), lengths)
        assert isinstance(ctx, FakeTensor)
        assert (ctx.shape, weights.shape) == ((B, 2, I), (B, 2, T))
    # meta construction, then materialize and reset: equal to one constructed normally with the seed
    meta = seqfast.nn.Attention(I, I, score=score, device="meta", **kw).to_empty(device="cpu")
    torch.manual_seed(0)
    meta.reset_parameters()
    torch.manual_seed(0)
    eager = seqfast.nn.Attention(I, I, score=score, **kw)
    q, m = args("cpu")
    torch.testing.assert_close(meta(q, m, lengths), eager(q, m, lengths))
