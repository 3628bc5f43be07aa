"""torch.func transforms over seqfast modules, against torch.nn (and seqfast.reference for Attention).

Reverse mode (grad, vjp, jacrev, functional_call under them) must give torch.nn's results; vmap over the
input must work with one op call per layer and direction (the batching rule folds the mapped dimension
into the batch), without torch's per-example fallback warning, and equal a loop over examples; forward
mode goes as far as torch.nn does.
"""
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
import seqfast.func
import seqfast.nn
import seqfast.reference
from conftest import dtype_id, make_module_pair, tolerance

T, B, I, H = 5, 3, 4, 6

# (kind, constructor kwargs): every layer, both directions, 2 layers, proj_size, batch_first, no bias.
LAYERS = [
    ("LSTM", {}),
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(batch_first=True, bias=False)),
    ("RNN_TANH", dict(bidirectional=True)),
    ("RNN_RELU", dict(num_layers=2)),
]
LAYER_IDS = [f"{k}-" + "-".join(f"{n}{v}" for n, v in kw.items()) for k, kw in LAYERS]
CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", dict(nonlinearity="tanh")),
         ("RNNCell", dict(nonlinearity="relu")), ("GRUCell", dict(bias=False))]
CELL_IDS = [f"{n}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for n, kw in CELLS]


def params_of(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def layer_input(module, dtype, seed=1, batch=B):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, T, I) if module.batch_first else (T, batch, I)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def initial_state(kind, module, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    h0 = torch.randn(module.num_layers * D, B, P, generator=g, dtype=torch.float64).to(dtype)
    if kind != "LSTM":
        return h0
    return h0, torch.randn(module.num_layers * D, B, module.hidden_size, generator=g,
                           dtype=torch.float64).to(dtype)


def flat_outputs(out):
    """(output, h_n[, c_n]) of a layer, or the states of a cell, as a flat tuple."""
    if isinstance(out, torch.Tensor):
        return (out,)
    output, hidden = out
    return (output, *hidden) if isinstance(hidden, tuple) else (output, hidden)


def assert_trees_close(got, want, dtype, what):
    tol = tolerance(dtype)
    if isinstance(want, dict):
        assert set(got) == set(want), what
        for k in want:
            torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{what} {k}: {m}")
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            assert_trees_close(a, b, dtype, f"{what}[{i}]")
    else:
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def make_cell_pair(name, kw, dtype):
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(I, H, **kw).to(dtype)
    sf = getattr(seqfast.nn, name)(I, H, **kw).to(dtype)
    sf.load_state_dict(ref.state_dict())
    return ref, sf


# ------------------------------------------------------------------------------------------------------
# Reverse mode: grad, vjp, jacrev
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_layer_grad_matches_torch(kind, kw, dtype):
    ref, sf = make_module_pair(kind, I, H, dtype, **kw)
    x, hx = layer_input(sf, dtype), initial_state(kind, sf, dtype)

    def loss(module):
        def f(params, x, hx):
            outs = flat_outputs(functional_call(module, params, (x, hx)))
            return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
        return f

    got = grad(loss(sf), argnums=(0, 1, 2))(params_of(sf), x, hx)
    want = grad(loss(ref), argnums=(0, 1, 2))(params_of(ref), x, hx)
    assert_trees_close(got, want, dtype, "grad")


@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_layer_vjp_matches_torch(kind, kw):
    dtype = torch.float64
    ref, sf = make_module_pair(kind, I, H, dtype, **kw)
    x, hx = layer_input(sf, dtype), initial_state(kind, sf, dtype)
    out_sf, vjp_sf = vjp(lambda p, x, hx: flat_outputs(functional_call(sf, p, (x, hx))), params_of(sf), x, hx)
    out_ref, vjp_ref = vjp(lambda p, x, hx: flat_outputs(functional_call(ref, p, (x, hx))), params_of(ref), x, hx)
    assert_trees_close(out_sf, out_ref, dtype, "outputs")
    g = torch.Generator().manual_seed(5)
    cotangents = tuple(torch.randn(o.shape, generator=g, dtype=dtype) for o in out_ref)
    assert_trees_close(vjp_sf(cotangents), vjp_ref(cotangents), dtype, "vjp")


@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_layer_jacrev_matches_torch(kind, kw):
    dtype = torch.float64
    ref, sf = make_module_pair(kind, I, H, dtype, **kw)
    x = layer_input(sf, dtype)
    # d(output)/d(input) and d(h_n)/d(parameters): jacrev vmaps the backward over the basis vectors.
    assert_trees_close(jacrev(lambda x: sf(x)[0])(x), jacrev(lambda x: ref(x)[0])(x), dtype, "jacrev input")

    def h_n(module):
        return lambda p: flat_outputs(functional_call(module, p, (x,)))[1]

    assert_trees_close(jacrev(h_n(sf))(params_of(sf)), jacrev(h_n(ref))(params_of(ref)), dtype, "jacrev params")


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind,kw", LAYERS[:4], ids=LAYER_IDS[:4])
def test_packed_grad_matches_torch_eager(kind, kw, enforce_sorted):
    """torch.func.grad with a PackedSequence input, by its packed data and the parameters. torch.nn's own
    layers fail here on 2.13 ("Cannot access data pointer of Tensor that doesn't have storage"), so
    seqfast is compared with torch.nn's eager autograd."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, I, H, dtype, **kw)
    lengths = [T, 2, T - 1] if not enforce_sorted else [T, T - 1, 2]
    packed = pack_padded_sequence(layer_input(sf, dtype), lengths, enforce_sorted=enforce_sorted)

    def loss(module, params, data):
        seq = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        out = functional_call(module, params, (seq,))
        outs = (out[0].data, *flat_outputs((None, out[1]))[1:])
        return sum((o * o.detach().sign()).sum() + o.pow(2).sum() for o in outs)

    got = grad(lambda p, d: loss(sf, p, d), argnums=(0, 1))(params_of(sf), packed.data)
    leaves = {k: v.clone().requires_grad_() for k, v in params_of(ref).items()}
    data = packed.data.clone().requires_grad_()
    want = torch.autograd.grad(loss(ref, leaves, data), [*leaves.values(), data])
    assert_trees_close(got, (dict(zip(leaves, want[:-1])), want[-1]), dtype, "packed grad")


@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("name,kw", CELLS, ids=CELL_IDS)
def test_cell_grad_vjp_jacrev_match_torch(name, kw, with_hx):
    dtype = torch.float64
    ref, sf = make_cell_pair(name, kw, dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, I, generator=g, dtype=dtype)
    hx = None
    if with_hx:
        hx = torch.randn(B, H, generator=g, dtype=dtype)
        hx = (hx, torch.randn(B, H, generator=g, dtype=dtype)) if name == "LSTMCell" else hx

    def states(module):
        return lambda p, x: flat_outputs(functional_call(module, p, (x, hx)))

    def loss(module):
        return lambda p, x: sum(o.pow(2).sum() + o.sum() for o in states(module)(p, x))

    assert_trees_close(grad(loss(sf), argnums=(0, 1))(params_of(sf), x),
                       grad(loss(ref), argnums=(0, 1))(params_of(ref), x), dtype, "grad")
    out_sf, fn_sf = vjp(states(sf), params_of(sf), x)
    out_ref, fn_ref = vjp(states(ref), params_of(ref), x)
    assert_trees_close(out_sf, out_ref, dtype, "outputs")
    cot = tuple(torch.randn(o.shape, generator=g, dtype=dtype) for o in out_ref)
    assert_trees_close(fn_sf(cot), fn_ref(cot), dtype, "vjp")
    assert_trees_close(jacrev(states(sf), argnums=(0, 1))(params_of(sf), x),
                       jacrev(states(ref), argnums=(0, 1))(params_of(ref), x), dtype, "jacrev")
    # unbatched input (1-D), under grad
    x1 = x[0]
    one = {k: (v[0] if isinstance(v, torch.Tensor) else tuple(t[0] for t in v)) for k, v in {"hx": hx}.items()
           if v is not None}

    def loss1(module):
        return lambda p, x: sum(o.sum() for o in flat_outputs(functional_call(module, p, (x, one.get("hx")))))

    assert_trees_close(grad(loss1(sf))(params_of(sf), x1), grad(loss1(ref))(params_of(ref), x1), dtype,
                       "unbatched grad")


# ------------------------------------------------------------------------------------------------------
# Attention, against the padded reference
# ------------------------------------------------------------------------------------------------------
ATTENTION = [("dot", {}), ("scaled_dot", {}), ("general", {}), ("concat", dict(bias=True)),
             ("location", dict(max_memory_len=7))]


def reference_attention(attn, params, query, memory, lengths):
    extra = {}
    if attn.score in ("general", "location"):
        extra["weight"] = params["weight"]
    elif attn.score == "concat":
        extra = dict(w_query=params["w_query"], w_memory=params["w_memory"], v=params["v"],
                     bias=params.get("bias"))
    return seqfast.reference.attention(query, memory, lengths, attn.score, **extra)


@pytest.mark.parametrize("steps", [None, 4], ids=["one_step", "all_steps"])
@pytest.mark.parametrize("score,kw", ATTENTION, ids=[a for a, _ in ATTENTION])
def test_attention_grad_vjp_jacrev_match_reference(score, kw, steps):
    dtype = torch.float64
    Dq = Dm = 5
    torch.manual_seed(0)
    attn = seqfast.nn.Attention(Dq, Dm, score=score, **kw).to(dtype)
    g = torch.Generator().manual_seed(4)
    query = torch.randn((B, Dq) if steps is None else (B, steps, Dq), generator=g, dtype=dtype)
    memory = torch.randn(B, 6, Dm, generator=g, dtype=dtype)
    lengths = torch.tensor([6, 2, 4])

    def ours(p, q, m):
        return functional_call(attn, p, (q, m, lengths))

    def reference(p, q, m):
        return reference_attention(attn, p, q, m, lengths)

    params = params_of(attn)
    assert_trees_close(ours(params, query, memory), reference(params, query, memory), dtype, "forward")

    def loss(f):
        return lambda p, q, m: sum((o * o.detach().sign()).sum() + o.pow(2).sum() for o in f(p, q, m))

    assert_trees_close(grad(loss(ours), argnums=(0, 1, 2))(params, query, memory),
                       grad(loss(reference), argnums=(0, 1, 2))(params, query, memory), dtype, "grad")
    out, fn = vjp(ours, params, query, memory)
    out_ref, fn_ref = vjp(reference, params, query, memory)
    cot = tuple(torch.randn(o.shape, generator=g, dtype=dtype) for o in out_ref)
    assert_trees_close(fn(cot), fn_ref(cot), dtype, "vjp")
    assert_trees_close(jacrev(ours, argnums=(0, 1))(params, query, memory),
                       jacrev(reference, argnums=(0, 1))(params, query, memory), dtype, "jacrev")


def test_attention_vmap_matches_loop_without_warning():
    torch.manual_seed(0)
    attn = seqfast.nn.Attention(5, 5, score="concat").double()
    memory = torch.randn(B, 6, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    queries = torch.randn(4, B, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda q: attn(q, memory, lengths)[0])(queries)
    torch.testing.assert_close(got, torch.stack([attn(q, memory, lengths)[0] for q in queries]))


def test_attention_forward_mode_raises_clear_error():
    attn = seqfast.nn.Attention(5, 5, score="general").double()
    q, memory = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 6, 5, dtype=torch.float64)
    message = "seqfast: forward-mode AD .* not supported by seqfast::attention_forward"
    with pytest.raises(NotImplementedError, match=message):
        jvp(lambda q: attn(q, memory)[0], (q,), (torch.ones_like(q),))


# ------------------------------------------------------------------------------------------------------
# vmap: one op call per layer and direction, no fallback warning, equal to a loop
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def forward_calls(monkeypatch):
    """Shapes of the inputs of the forward op's kernel calls made through seqfast.func (the autograd.Function
    calls it on vmap's batched tensors, the batching rule on plain ones: only the latter run the kernel)."""
    calls = []
    op = seqfast.func._FORWARD

    def counted(*args):
        if not any(isinstance(a, torch.Tensor) and torch._C._functorch.is_batchedtensor(a) for a in args):
            calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(seqfast.func, "_FORWARD", counted)
    return calls


@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_vmap_over_input_folds_into_one_call(kind, kw, forward_calls):
    _, sf = make_module_pair(kind, I, H, torch.float64, **kw)
    V = 4
    xs = torch.stack([layer_input(sf, torch.float64, seed=s) for s in range(V)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "There is a performance drop ..." fallback warning
        got = vmap(lambda x: flat_outputs(sf(x)))(xs)
    calls_per_example = sf.num_layers * (2 if sf.bidirectional else 1)
    assert len(forward_calls) == calls_per_example, forward_calls
    assert all(shape[1] == V * B for shape in forward_calls), forward_calls  # the folded batch
    want = [flat_outputs(sf(x)) for x in xs]
    assert_trees_close(got, tuple(torch.stack(parts) for parts in zip(*want)), torch.float64, "vmap")


@pytest.mark.parametrize("name,kw", CELLS, ids=CELL_IDS)
def test_vmap_cell_over_input_and_state(name, kw, forward_calls):
    _, sf = make_cell_pair(name, kw, torch.float64)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(5, B, I, generator=g, dtype=torch.float64)
    hs = torch.randn(5, B, H, generator=g, dtype=torch.float64)
    hx = (hs, hs.flip(0)) if name == "LSTMCell" else hs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda x, h: flat_outputs(sf(x, h)))(xs, hx)
    assert len(forward_calls) == 1
    if name == "LSTMCell":
        want = [flat_outputs(sf(x, (h, c))) for x, h, c in zip(xs, hs, hs.flip(0))]
    else:
        want = [flat_outputs(sf(x, h)) for x, h in zip(xs, hs)]
    assert_trees_close(got, tuple(torch.stack(p) for p in zip(*want)), torch.float64, "vmap cell")


def test_vmap_over_state_only_and_unbatched_input(forward_calls):
    _, sf = make_module_pair("GRU", I, H, torch.float64, num_layers=2)
    x = torch.randn(T, I, dtype=torch.float64)  # unbatched input, shared
    h0s = torch.randn(3, 2, H, dtype=torch.float64)  # mapped initial states
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda h: flat_outputs(sf(x, h)), in_dims=0)(h0s)
    assert len(forward_calls) == 2
    want = [flat_outputs(sf(x, h)) for h in h0s]
    assert_trees_close(got, tuple(torch.stack(p) for p in zip(*want)), torch.float64, "vmap state")


def test_vmap_over_parameters_runs_per_model_without_warning():
    """Model ensembles (parameters mapped): no common weights to fold over, one call per model."""
    dtype = torch.float64
    torch.manual_seed(0)
    models = [seqfast.nn.LSTM(I, H, bidirectional=True).to(dtype) for _ in range(3)]
    refs = [torch.nn.LSTM(I, H, bidirectional=True).to(dtype) for _ in range(3)]
    for r, m in zip(refs, models):
        r.load_state_dict(m.state_dict())
    params, buffers = stack_module_state(models)
    x = layer_input(models[0], dtype)
    base = models[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda p, b: flat_outputs(functional_call(base, (p, b), (x,))), in_dims=(0, 0))(params, buffers)
    want = [flat_outputs(r(x)) for r in refs]
    assert_trees_close(got, tuple(torch.stack(p) for p in zip(*want)), dtype, "ensemble")


@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_per_sample_gradients_match_torch(kind, kw):
    """vmap(grad(...)): per-example gradients of every parameter, against torch.nn example by example."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, I, H, dtype, **kw)
    xs = torch.stack([layer_input(sf, dtype, seed=s, batch=2) for s in range(3)])

    def loss(module):
        return lambda p, x: sum(o.pow(2).sum() + o.sum() for o in flat_outputs(functional_call(module, p, (x,))))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(grad(loss(sf), argnums=(0, 1)), in_dims=(None, 0))(params_of(sf), xs)
    per_example = [grad(loss(ref), argnums=(0, 1))(params_of(ref), x) for x in xs]
    want = ({k: torch.stack([p[0][k] for p in per_example]) for k in per_example[0][0]},
            torch.stack([p[1] for p in per_example]))
    assert_trees_close(got, want, dtype, "per-sample grads")


# ------------------------------------------------------------------------------------------------------
# Forward mode: as far as torch.nn goes
# ------------------------------------------------------------------------------------------------------
def _torch_supports_jvp(module, x):
    try:
        jvp(lambda x: module(x)[0], (x,), (torch.ones_like(x),))
        return True
    except NotImplementedError:
        return False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kind,kw", LAYERS, ids=LAYER_IDS)
def test_layer_jvp_matches_torch(kind, kw, dtype):
    ref, sf = make_module_pair(kind, I, H, dtype, **kw)
    x = layer_input(sf, dtype)
    tangent = torch.randn_like(x)
    params = params_of(sf)
    p_tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def f(module):
        return lambda p, x: flat_outputs(functional_call(module, p, (x,)))

    if not _torch_supports_jvp(ref, x):
        # torch.nn.LSTM in float32 runs oneDNN, which has no forward AD ("Trying to use forward AD with
        # mkldnn_rnn_layer that does not support it"): seqfast, running torch's implementation in
        # forward mode, raises the same error rather than crashing or returning a wrong tangent.
        with pytest.raises(NotImplementedError, match="forward AD"):
            jvp(f(sf), (params, x), (p_tangent, tangent))
        return
    got = jvp(f(sf), (params, x), (p_tangent, tangent))
    want = jvp(f(ref), (params_of(ref), x), (p_tangent, tangent))
    assert_trees_close(got, want, dtype, "jvp")


@pytest.mark.parametrize("name,kw", CELLS, ids=CELL_IDS)
def test_cell_jvp_and_jacfwd_match_torch(name, kw):
    dtype = torch.float64
    ref, sf = make_cell_pair(name, kw, dtype)
    x = torch.randn(B, I, dtype=dtype)
    f_sf = lambda x: flat_outputs(sf(x))  # noqa: E731
    f_ref = lambda x: flat_outputs(ref(x))  # noqa: E731
    tangent = (torch.ones_like(x),)
    assert_trees_close(jvp(f_sf, (x,), tangent), jvp(f_ref, (x,), tangent), dtype, "jvp")
    assert_trees_close(jacfwd(f_sf)(x), jacfwd(f_ref)(x), dtype, "jacfwd")


def test_layer_jacfwd_matches_torch():
    ref, sf = make_module_pair("GRU", I, H, torch.float64, bidirectional=True)
    x = layer_input(sf, torch.float64)
    assert_trees_close(jacfwd(lambda x: sf(x)[0])(x), jacfwd(lambda x: ref(x)[0])(x), torch.float64, "jacfwd")


def test_eager_forward_ad_matches_torch():
    import torch.autograd.forward_ad as fwAD
    ref, sf = make_module_pair("LSTM", I, H, torch.float64, num_layers=2)
    x = layer_input(sf, torch.float64)
    tangent = torch.randn_like(x)
    results = []
    for module in (sf, ref):
        with fwAD.dual_level():
            out = module(fwAD.make_dual(x, tangent))[0]
            results.append(fwAD.unpack_dual(out))
    torch.testing.assert_close(results[0].primal, results[1].primal)
    torch.testing.assert_close(results[0].tangent, results[1].tangent)


# ------------------------------------------------------------------------------------------------------
# What stays as it was
# ------------------------------------------------------------------------------------------------------
def test_eager_calls_keep_the_cpp_autograd_kernel():
    """Outside transforms the layer must not go through the Python autograd.Function (the slow path)."""
    sf = seqfast.nn.LSTMCell(I, H)
    h, _ = sf(torch.randn(B, I, requires_grad=True))
    assert "RecurrentLayerFunction" not in type(h.grad_fn).__name__, type(h.grad_fn).__name__
    layer = seqfast.nn.GRU(I, H)
    out, _ = layer(torch.randn(T, B, I))
    assert "RecurrentLayerFunction" not in type(out.grad_fn).__name__


@pytest.mark.parametrize("transform", ["hessian", "grad_of_grad", "jacrev_of_jacrev"])
@pytest.mark.parametrize("module", ["GRU", "LSTMCell"])
def test_higher_order_under_transforms_matches_torch(transform, module):
    """Nested differentiation runs torch's implementation (the fused backward has no derivative)."""
    dtype = torch.float64
    if module == "GRU":
        ref, sf = make_module_pair("GRU", I, H, dtype, bidirectional=True)
        x = layer_input(sf, dtype)
    else:
        ref, sf = make_cell_pair("LSTMCell", {}, dtype)
        x = torch.randn(B, I, dtype=dtype)

    def f(m):
        return lambda x: flat_outputs(m(x))[0].pow(3).sum()

    outer = {"hessian": torch.func.hessian,
             "grad_of_grad": lambda g: grad(lambda x: grad(g)(x).pow(2).sum()),
             "jacrev_of_jacrev": lambda g: jacrev(jacrev(g))}[transform]
    assert_trees_close(outer(f(sf))(x), outer(f(ref))(x), dtype, transform)


def test_backward_refuses_to_be_differentiated_under_transforms():
    """The safety net: a fused backward reached by an outer transform raises instead of silently giving a
    zero second derivative (here the layer runs outside the inner grad, so its forward saw one level)."""
    sf = seqfast.nn.RNN(I, H).double()
    x = layer_input(sf, torch.float64)

    def inner(x):
        out = sf(x)[0]
        return torch.func.vjp(lambda o: o.pow(2).sum(), out)[1](torch.tensor(1.0, dtype=torch.float64))[0].sum()

    # grad(inner) differentiates vjp's backward only through ops torch knows: this must simply work.
    torch.testing.assert_close(grad(inner)(x), grad(lambda x: 2 * sf(x)[0].sum())(x))


def test_vmap_then_eager_backward_matches_loop():
    """A vmapped model trained with ordinary autograd outside the transform."""
    torch.manual_seed(0)
    sf = seqfast.nn.LSTM(I, H, num_layers=2).double()
    xs = torch.randn(3, T, 2, I, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = vmap(lambda x: sf(x)[0])(xs)
    got = torch.autograd.grad(out.pow(2).sum(), [xs, *sf.parameters()])
    loop = torch.stack([sf(x)[0] for x in xs])
    want = torch.autograd.grad(loop.pow(2).sum(), [xs, *sf.parameters()])
    torch.testing.assert_close(out, loop)
    assert_trees_close(got, want, torch.float64, "grads")


def test_vmap_over_packed_data_matches_loop(forward_calls):
    """Packed input: its batch_sizes describe one example's batch, so the rule runs one call per example."""
    torch.manual_seed(0)
    sf = seqfast.nn.GRU(I, H, bidirectional=True).double()
    packed = pack_padded_sequence(torch.randn(T, 3, I, dtype=torch.float64), [T, 2, 4], enforce_sorted=False)
    datas = torch.randn(4, *packed.data.shape, dtype=torch.float64)

    def run(data):
        out, h = sf(PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices))
        return out.data, h

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(run)(datas)
    assert len(forward_calls) == 4 * 2  # per example, per direction
    want = [run(d) for d in datas]
    assert_trees_close(got, tuple(torch.stack(p) for p in zip(*want)), torch.float64, "vmap packed")


def test_nested_vmap_and_mapped_dim_not_first(forward_calls):
    torch.manual_seed(0)
    sf = seqfast.nn.LSTM(I, H, bidirectional=True).double()
    xs = torch.randn(T, 2, 3, B, I, dtype=torch.float64)  # mapped dims at 1 and (then) 1 again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(vmap(lambda x: flat_outputs(sf(x)), in_dims=1), in_dims=1)(xs)
    assert len(forward_calls) == 2  # both vmapped dims folded into one call per direction
    runs = [[flat_outputs(sf(xs[:, i, j])) for j in range(3)] for i in range(2)]
    want = tuple(torch.stack([torch.stack([runs[i][j][k] for j in range(3)]) for i in range(2)])
                 for k in range(3))
    assert_trees_close(got, want, torch.float64, "nested vmap")
