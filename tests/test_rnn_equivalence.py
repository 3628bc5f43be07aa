"""seqfast.nn.LSTM / GRU / RNN against torch.nn: outputs, final states and every gradient."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import (
    CELL_KINDS,
    DTYPES,
    INPUT_KINDS,
    InputSpec,
    assert_results_close,
    compare_with_torch,
    covering_grid,
    dtype_id,
    make_hidden,
    make_module_pair,
    run_forward_backward,
    tolerance,
)

# Small sizes for the grid: T <= 7, B <= 4, input and hidden sizes <= 8.
T, B, INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE = 6, 4, 5, 7, 3

# The grid. The full product of every axis is ~1900 cases; instead take the full product of the axes
# that select different code paths in a kernel (cell kind x input layout x dtype x direction x initial
# state) and choose the remaining axes (num_layers, batch_first, bias, proj_size) greedily so that every
# combination of values of any THREE axes occurs together at least once (e.g. every kind x num_layers x
# input layout); proj_size varies for LSTM only. 128 cases. test_grid_covers_every_triple checks it.
BASE_AXES = {
    "kind": list(CELL_KINDS),
    "input": list(INPUT_KINDS),
    "dtype": list(DTYPES),
    "bidirectional": [False, True],
    "hx": [False, True],
}
FREE_AXES = {
    "num_layers": [1, 2, 3],
    "batch_first": [False, True],
    "bias": [False, True],
    "proj_size": lambda row: [0, PROJ_SIZE] if row.get("kind") == "LSTM" else [0],
}
GRID, _NEEDED_TRIPLES = covering_grid(BASE_AXES, FREE_AXES, strength=3)


def _row_id(r):
    return "-".join(
        [
            r["kind"],
            r["input"],
            dtype_id(r["dtype"]),
            "bi" if r["bidirectional"] else "uni",
            "hx" if r["hx"] else "nohx",
            f"L{r['num_layers']}",
            "bf" if r["batch_first"] else "tf",
            "bias" if r["bias"] else "nobias",
            f"p{r['proj_size']}",
        ]
    )


def test_grid_covers_every_triple():
    """The pruned grid still combines every value of every axis with every value of any two other axes
    (in particular with every cell kind), and contains the full product of the base axes."""
    covered = set()
    names = list(BASE_AXES) + list(FREE_AXES)
    for r in GRID:
        covered |= set(itertools.combinations([(n, r[n]) for n in names], 3))
    assert len(_NEEDED_TRIPLES) > 1000
    assert _NEEDED_TRIPLES - covered == set()
    for combo in itertools.product(*BASE_AXES.values()):
        assert any(all(r[n] == v for n, v in zip(BASE_AXES, combo)) for r in GRID), combo
    # spot-check the semantics: every kind meets every num_layers / bias / batch_first / input kind
    for kind in CELL_KINDS:
        rows = [r for r in GRID if r["kind"] == kind]
        for axis, vals in [("num_layers", [1, 2, 3]), ("bias", [False, True]), ("batch_first", [False, True]),
                           ("input", list(INPUT_KINDS)), ("hx", [False, True]), ("dtype", list(DTYPES)),
                           ("bidirectional", [False, True])]:
            assert {r[axis] for r in rows} == set(vals), (kind, axis)
    assert {r["proj_size"] for r in GRID if r["kind"] == "LSTM"} == {0, PROJ_SIZE}
    assert len({_row_id(r) for r in GRID}) == len(GRID)
    assert len(list(itertools.product(*BASE_AXES.values()))) <= len(GRID) < 300


@pytest.mark.parametrize("row", GRID, ids=[_row_id(r) for r in GRID])
def test_equivalence_grid(row):
    kind, dtype = row["kind"], row["dtype"]
    ref, sf = make_module_pair(
        kind,
        INPUT_SIZE,
        HIDDEN_SIZE,
        dtype,
        num_layers=row["num_layers"],
        bidirectional=row["bidirectional"],
        batch_first=row["batch_first"],
        bias=row["bias"],
        proj_size=row["proj_size"],
    )
    spec = InputSpec(row["input"], T, B, INPUT_SIZE, row["batch_first"], dtype)
    r_ref, r_sf = compare_with_torch(kind, ref, sf, spec, row["hx"], dtype, what=_row_id(row))
    # sanity of the test itself: the comparison is not vacuous
    assert r_ref.output.abs().sum() > 0
    assert len(r_ref.grads) >= 3 + (1 if row["hx"] else 0)


# ---------------------------------------------------------------------------------------------------
# Awkward sizes
# ---------------------------------------------------------------------------------------------------
ODD_CONFIGS = [
    # kind, input kind, extra kwargs
    ("LSTM", "packed_unsorted", dict(num_layers=2, bidirectional=True, proj_size=23)),
    ("LSTM", "padded", dict(num_layers=1, bidirectional=True)),
    ("GRU", "packed_unsorted", dict(num_layers=2, bidirectional=True)),
    ("RNN_TANH", "padded", dict(num_layers=2, bidirectional=True)),
    ("RNN_RELU", "packed_sorted", dict(num_layers=1, bidirectional=True)),
]


@pytest.mark.parametrize("kind,input_kind,kw", ODD_CONFIGS, ids=[f"{k}-{i}" for k, i, _ in ODD_CONFIGS])
def test_odd_sizes(kind, input_kind, kw):
    _odd_sizes(kind, input_kind, kw, torch.float64)


@pytest.mark.parametrize("kind,input_kind,kw", ODD_CONFIGS[1:], ids=[f"{k}-{i}" for k, i, _ in ODD_CONFIGS[1:]])
def test_odd_sizes_float32(kind, input_kind, kw):
    """The same awkward sizes in float32 (vectorized loops with remainders, the float32 GEMM path), at
    torch's own float32 RNN tolerance."""
    _odd_sizes(kind, input_kind, kw, torch.float32)


def _odd_sizes(kind, input_kind, kw, dtype):
    H, T_odd, B_odd, I_odd = 59, 97, 5, 13
    ref, sf = make_module_pair(kind, I_odd, H, dtype, **kw)
    if kind == "RNN_RELU":
        # keep relu activations bounded over 97 steps
        with torch.no_grad():
            for m in (ref, sf):
                for n, p in m.named_parameters():
                    if "weight_hh" in n:
                        p.mul_(0.5)
    spec = InputSpec(input_kind, T_odd, B_odd, I_odd, False, dtype)
    compare_with_torch(kind, ref, sf, spec, True, dtype, what=f"odd {kind}")


# ---------------------------------------------------------------------------------------------------
# Non-contiguous inputs, states and weights
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_non_contiguous(kind, dtype):
    num_layers, D = 2, 2
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=num_layers, bidirectional=True)
    g = torch.Generator().manual_seed(5)
    # input: (T, B, 2*I) -> every other feature, then a transposed view of a (B, T, I) tensor
    base_x = torch.randn(B, T, 2 * INPUT_SIZE, generator=g, dtype=torch.float64).to(dtype)
    base_h = torch.randn(B, num_layers * D, HIDDEN_SIZE, generator=g, dtype=torch.float64).to(dtype)
    base_c = torch.randn(B, num_layers * D, 2 * HIDDEN_SIZE, generator=g, dtype=torch.float64).to(dtype)

    def run(m):
        xl = base_x.clone().requires_grad_(True)
        hl = base_h.clone().requires_grad_(True)
        cl = base_c.clone().requires_grad_(True)
        x = xl.transpose(0, 1)[..., ::2]
        h0 = hl.transpose(0, 1)
        c0 = cl.transpose(0, 1)[..., HIDDEN_SIZE:]
        assert not x.is_contiguous() and not h0.is_contiguous() and not c0.is_contiguous()
        if kind == "LSTM":
            out, (hn, cn) = m(x, (h0, c0))
            leaves, outs = [xl, hl, cl], [out, hn, cn]
        else:
            out, hn = m(x, h0)
            leaves, outs = [xl, hl], [out, hn]
        gen = torch.Generator().manual_seed(11)
        gos = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype) for o in outs]
        params = [p for _, p in m.named_parameters()]
        grads = torch.autograd.grad(outs, leaves + params, gos)
        return [o.detach() for o in outs], grads

    o_ref, g_ref = run(ref)
    o_sf, g_sf = run(sf)
    tol = tolerance(dtype)
    for a, b in zip(o_sf, o_ref):
        torch.testing.assert_close(a, b, **tol)
    names = ["input", "h0"] + (["c0"] if kind == "LSTM" else []) + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, g_sf, g_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_non_contiguous_weights(kind):
    """Parameters that are transposed views (e.g. from weight tying or a user's surgery)."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2)
    for m in (ref, sf):
        for n in ["weight_hh_l0", "weight_ih_l1"]:
            w = getattr(m, n).detach()
            setattr(m, n, torch.nn.Parameter(w.t().contiguous().t()))
            assert not getattr(m, n).is_contiguous()
    spec = InputSpec("padded", T, B, INPUT_SIZE, False, dtype)
    compare_with_torch(kind, ref, sf, spec, True, dtype, what="non-contiguous weights")


# ---------------------------------------------------------------------------------------------------
# Batch 0
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_batch_zero(kind, bidirectional):
    dtype = torch.float64
    proj = PROJ_SIZE if kind == "LSTM" else 0
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, bidirectional=bidirectional,
                               proj_size=proj)
    D = 2 if bidirectional else 1
    hout = proj or HIDDEN_SIZE
    results = []
    for m in (ref, sf):
        x = torch.randn(T, 0, INPUT_SIZE, dtype=dtype, requires_grad=True)
        out, hidden = m(x)
        assert out.shape == (T, 0, D * hout)
        h_n = hidden[0] if kind == "LSTM" else hidden
        assert h_n.shape == (2 * D, 0, hout)
        if kind == "LSTM":
            assert hidden[1].shape == (2 * D, 0, HIDDEN_SIZE)
        loss = out.sum() + h_n.sum() + (hidden[1].sum() if kind == "LSTM" else 0)
        loss.backward()
        assert x.grad is not None and x.grad.shape == x.shape
        grads = {n: p.grad for n, p in m.named_parameters()}
        results.append((out, grads))
    for n, g_ref in results[0][1].items():
        g_sf = results[1][1][n]
        assert g_sf is not None, n
        torch.testing.assert_close(g_sf, g_ref, atol=0, rtol=0)  # all zeros


# ---------------------------------------------------------------------------------------------------
# Modes: eval with gradients, no_grad
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_eval_mode_backward(kind):
    """model.eval() must not disable backward (fine-tuning with frozen dropout is common)."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, bidirectional=True, dropout=0.3)
    ref.eval()
    sf.eval()
    spec = InputSpec("packed_unsorted", T, B, INPUT_SIZE, False, dtype)
    compare_with_torch(kind, ref, sf, spec, True, dtype, what="eval")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_no_grad_forward(kind):
    dtype = torch.float32
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, bidirectional=True)
    spec = InputSpec("padded", T, B, INPUT_SIZE, True, dtype)
    with torch.no_grad():
        r_ref = run_forward_backward(kind, ref, spec, backward=False)
        r_sf = run_forward_backward(kind, sf, spec, backward=False)
    assert_results_close(r_ref, r_sf, dtype, what="no_grad")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_repeated_calls_and_parameter_updates(kind):
    """After an in-place optimizer step the seqfast module uses the new weights (no stale caches)."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2)
    spec = InputSpec("padded", T, B, INPUT_SIZE, False, dtype)
    for step in range(2):
        compare_with_torch(kind, ref, sf, spec, False, dtype, what=f"step {step}")
        with torch.no_grad():
            for (_, p_ref), (_, p_sf) in zip(ref.named_parameters(), sf.named_parameters()):
                p_ref.add_(0.05 * torch.ones_like(p_ref))
                p_sf.add_(0.05 * torch.ones_like(p_sf))


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_eval_equals_torch(kind):
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=3, dropout=0.5)
    ref.eval()
    sf.eval()
    spec = InputSpec("padded", T, B, INPUT_SIZE, False, dtype)
    compare_with_torch(kind, ref, sf, spec, True, dtype, what="dropout eval")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_zero_training_equals_torch(kind):
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, dropout=0.0)
    assert ref.training and sf.training
    spec = InputSpec("packed_sorted", T, B, INPUT_SIZE, False, dtype)
    compare_with_torch(kind, ref, sf, spec, True, dtype, what="dropout 0 training")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_single_layer_training_is_identity(kind):
    """With num_layers=1 dropout is never applied (it only acts between layers)."""
    dtype = torch.float64
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=1, dropout=0.7,
                                   bidirectional=True)
    assert sf.training
    spec = InputSpec("padded", T, B, INPUT_SIZE, False, dtype)
    torch.manual_seed(0)
    compare_with_torch(kind, ref, sf, spec, True, dtype, what="1-layer dropout training")


def _layer_module(kind, src, layer, dtype, input_size):
    """A 1-layer torch.nn module carrying layer ``layer`` of ``src`` (both directions)."""
    D = 2 if src.bidirectional else 1
    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN}[kind]
    kw = dict(bidirectional=src.bidirectional, bias=src.bias)
    if kind == "LSTM":
        kw["proj_size"] = src.proj_size
    if kind == "RNN_RELU":
        kw["nonlinearity"] = "relu"
    m = cls(input_size, src.hidden_size, **kw).to(dtype)
    sd = {}
    for n, p in src.named_parameters():
        if f"_l{layer}" in n:
            sd[n.replace(f"_l{layer}", "_l0")] = p.detach()
    m.load_state_dict(sd, strict=True)
    return m, D


@pytest.mark.parametrize("input_kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_one_zeroes_the_second_layer_input(kind, input_kind):
    """p=1 in training: the second layer sees zeros, so its outputs equal a 1-layer torch module driven by
    zero input from the second layer's initial state, and the first layer's final state is untouched."""
    dtype = torch.float64
    proj = PROJ_SIZE if kind == "LSTM" else 0
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, dropout=1.0,
                               bidirectional=True, proj_size=proj)
    sf.train()
    spec = InputSpec(input_kind, T, B, INPUT_SIZE, False, dtype)
    h0, c0 = make_hidden(kind, ref, B, True, dtype)
    hx = (h0, c0) if kind == "LSTM" else h0
    out, hidden = sf(spec.wrap(spec.make()), hx)
    h_n = hidden[0] if kind == "LSTM" else hidden

    D = 2
    hout = proj or HIDDEN_SIZE
    layer1, _ = _layer_module(kind, ref, 1, dtype, D * hout)
    layer0, _ = _layer_module(kind, ref, 0, dtype, INPUT_SIZE)
    zeros = spec.wrap(torch.zeros(T, B, D * hout, dtype=dtype))
    hx1 = (h0[D:], c0[D:]) if kind == "LSTM" else h0[D:]
    hx0 = (h0[:D], c0[:D]) if kind == "LSTM" else h0[:D]
    with torch.no_grad():
        exp_out, exp_hidden = layer1(zeros, hx1)
        _, l0_hidden = layer0(spec.wrap(spec.data), hx0)
    got = out.data if spec.packed else out
    exp = exp_out.data if spec.packed else exp_out
    tol = tolerance(dtype)
    torch.testing.assert_close(got, exp, **tol)
    exp_h = exp_hidden[0] if kind == "LSTM" else exp_hidden
    l0_h = l0_hidden[0] if kind == "LSTM" else l0_hidden
    torch.testing.assert_close(h_n[D:], exp_h, **tol)
    torch.testing.assert_close(h_n[:D], l0_h, **tol)
    if kind == "LSTM":
        torch.testing.assert_close(hidden[1][D:], exp_hidden[1], **tol)
        torch.testing.assert_close(hidden[1][:D], l0_hidden[1], **tol)
    # and in eval mode the same module does not drop anything: equals torch.nn in eval
    sf.eval()
    ref.eval()
    r_ref = run_forward_backward(kind, ref, spec, (h0, c0))
    r_sf = run_forward_backward(kind, sf, spec, (h0, c0), grads_from=r_ref)
    assert_results_close(r_ref, r_sf, dtype, what="p=1 eval")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_half_only_between_layers(kind):
    """p=0.5 in training: the first layer is unaffected (its h_n equals the no-dropout run), the last
    layer's output differs from the no-dropout run, the same seed reproduces the same result, and
    gradients flow through the dropout mask (finite, nonzero)."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, dropout=0.5)
    spec = InputSpec("padded", T, B, INPUT_SIZE, False, dtype)
    h0, c0 = make_hidden(kind, ref, B, True, dtype)
    hx = (h0, c0) if kind == "LSTM" else h0

    def h_of(hidden):
        return hidden[0] if kind == "LSTM" else hidden

    ref.eval()
    with torch.no_grad():
        out_nodrop, hid_nodrop = ref(spec.data, hx)
    torch.manual_seed(123)
    out1, hid1 = sf(spec.data, hx)
    torch.manual_seed(123)
    x = spec.make()
    out2, hid2 = sf(x, hx)
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)
    torch.testing.assert_close(h_of(hid1), h_of(hid2), atol=0, rtol=0)
    tol = tolerance(dtype)
    torch.testing.assert_close(h_of(hid1)[0], h_of(hid_nodrop)[0], **tol)
    assert not torch.allclose(out1, out_nodrop, atol=1e-6), "dropout had no effect in training mode"
    out2.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("input_kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_training_matches_torch_same_seed(kind, input_kind):
    """Drop-in reproducibility: under the same manual seed, seqfast draws the same dropout masks as
    torch.nn (torch applies ``at::dropout`` to each non-last layer's output, in layer order)."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=3, dropout=0.4, bidirectional=True)
    spec = InputSpec(input_kind, T, B, INPUT_SIZE, False, dtype)
    hx = make_hidden(kind, ref, B, True, dtype)
    torch.manual_seed(2024)
    r_ref = run_forward_backward(kind, ref, spec, hx)
    torch.manual_seed(2024)
    r_sf = run_forward_backward(kind, sf, spec, hx, grads_from=r_ref)
    assert_results_close(r_ref, r_sf, dtype, what="dropout same seed")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_dropout_attribute_change_takes_effect(kind):
    """Setting ``.dropout`` after construction changes the behaviour (torch reads it on every call)."""
    dtype = torch.float64
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, dropout=0.0)
    spec = InputSpec("padded", T, B, INPUT_SIZE, False, dtype)
    with torch.no_grad():
        out_a = sf(spec.data)[0]
        sf.dropout = 1.0
        out_b = sf(spec.data)[0]
        ref.dropout = 1.0
        out_ref = ref(spec.data)[0]
    assert not torch.allclose(out_a, out_b)
    torch.testing.assert_close(out_b, out_ref, **tolerance(dtype))


# ---------------------------------------------------------------------------------------------------
# bfloat16: the fused kernels (float32 gates inside); more in tests/test_bf16.py
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_bfloat16_accuracy(kind, input_kind):
    """seqfast in bfloat16 runs (forward and backward) and its error against a float64 reference is at
    most twice torch.nn's own bfloat16 error (plus one bf16 ulp at 1.0 to absorb rounding ties).

    RNN_RELU: relu's derivative jumps at 0, so wherever a pre-activation lies within bfloat16 rounding
    of 0 either implementation may take the other branch than float64 and be off by a whole gradient
    term there (max errors of 0.1-0.5 for torch and seqfast alike, which one is worse being luck). Its
    errors are therefore summed over several seeds (weights and initial states) before comparing."""
    seeds = range(6) if kind == "RNN_RELU" else range(1)
    totals = {}
    for seed in seeds:
        ref64, _ = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, torch.float64, seed=seed, num_layers=2,
                                    bidirectional=True)
        ref_bf, sf_bf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, torch.bfloat16, seed=seed,
                                         num_layers=2, bidirectional=True)
        # all three share the same (bf16-representable) parameters
        ref64.load_state_dict({k: v.double() for k, v in ref_bf.state_dict().items()})
        spec64 = InputSpec(input_kind, T, B, INPUT_SIZE, False, torch.float64)
        spec_bf = InputSpec(input_kind, T, B, INPUT_SIZE, False, torch.bfloat16)
        spec64.data = spec_bf.data.double()
        hx_bf = make_hidden(kind, ref_bf, B, True, torch.bfloat16, seed=99 + seed)
        hx64 = tuple(None if h is None else h.detach().double() for h in hx_bf)

        r64 = run_forward_backward(kind, ref64, spec64, hx64)
        r_ref = run_forward_backward(kind, ref_bf, spec_bf, hx_bf)
        r_sf = run_forward_backward(kind, sf_bf, spec_bf, hx_bf, grads_from=r_ref)
        assert r_sf.output.dtype == torch.bfloat16

        pairs = [("output", r_ref.output, r_sf.output, r64.output), ("h_n", r_ref.h_n, r_sf.h_n, r64.h_n)]
        if kind == "LSTM":
            pairs.append(("c_n", r_ref.c_n, r_sf.c_n, r64.c_n))
        for name in r_ref.grads:
            pairs.append((f"grad {name}", r_ref.grads[name], r_sf.grads[name], r64.grads[name]))
        for name, a_ref, a_sf, a64 in pairs:
            assert a_sf is not None, name
            assert a_sf.dtype == torch.bfloat16, name
            assert torch.isfinite(a_sf).all(), name
            e_torch = (a_ref.double() - a64).abs().max().item()
            e_sf = (a_sf.double() - a64).abs().max().item()
            t_sum, s_sum = totals.get(name, (0.0, 0.0))
            totals[name] = (t_sum + e_torch, s_sum + e_sf)
    ulp = 2.0 ** -7
    for name, (e_torch, e_sf) in totals.items():
        assert e_sf <= 2 * e_torch + ulp * len(seeds), \
            f"{name}: seqfast bf16 error {e_sf} vs torch bf16 error {e_torch} (summed over {len(seeds)} seeds)"


# ---------------------------------------------------------------------------------------------------
# Only some of the inputs require gradients
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["params_only", "input_only", "h0_only", "params_and_h0"])
@pytest.mark.parametrize("input_kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_gradient_subsets(kind, input_kind, which):
    """The usual training case (input without grad, parameters with grad), frozen parameters, and
    gradients for the initial state only: the gradients that exist match torch's, and nothing else is
    computed for tensors that do not require grad."""
    dtype = torch.float64
    proj = PROJ_SIZE if kind == "LSTM" else 0
    ref, sf = make_module_pair(kind, INPUT_SIZE, HIDDEN_SIZE, dtype, num_layers=2, bidirectional=True,
                               proj_size=proj)
    spec = InputSpec(input_kind, T, B, INPUT_SIZE, False, dtype)
    h0_base, c0_base = make_hidden(kind, ref, B, True, dtype)
    want_x = which == "input_only"
    want_h = which in ("h0_only", "params_and_h0")
    want_p = which in ("params_only", "params_and_h0")

    def run(m):
        for p in m.parameters():
            p.requires_grad_(want_p)
        x = spec.data.clone().requires_grad_(want_x)
        h0 = h0_base.detach().clone().requires_grad_(want_h)
        c0 = c0_base.detach().clone().requires_grad_(want_h) if kind == "LSTM" else None
        out, hidden = m(spec.wrap(x), (h0, c0) if kind == "LSTM" else h0)
        out = out.data if spec.packed else out
        outs = [out] + (list(hidden) if kind == "LSTM" else [hidden])
        g = torch.Generator().manual_seed(8)
        gos = [torch.randn(o.shape, generator=g, dtype=dtype) for o in outs]
        leaves = {}
        if want_x:
            leaves["input"] = x
        if want_h:
            leaves["h0"] = h0
            if c0 is not None:
                leaves["c0"] = c0
        if want_p:
            leaves.update(dict(m.named_parameters()))
        assert all(o.requires_grad for o in outs)
        grads = torch.autograd.grad(outs, list(leaves.values()), gos)
        return [o.detach() for o in outs], dict(zip(leaves, grads))

    o_ref, g_ref = run(ref)
    o_sf, g_sf = run(sf)
    tol = tolerance(dtype)
    for a, b in zip(o_sf, o_ref):
        torch.testing.assert_close(a, b, **tol)
    assert set(g_sf) == set(g_ref) and g_ref
    for n in g_ref:
        torch.testing.assert_close(g_sf[n], g_ref[n], **tol, msg=lambda msg, n=n: f"grad {n}: {msg}")


# The backward takes grad_output with any strides: expanded from one value (a sum loss: filled, not
# copied; a sum mutated to fill twice the value fails the two "sum" cases), transposed, strided, and
# dense (a mean loss's gradient is divided, so dense), against torch.nn's gradients.
@pytest.mark.parametrize("loss", ["sum", "mean", "transposed", "strided_slice"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_gradients_for_strided_and_expanded_output_gradients(kind, loss):
    from conftest import make_module_pair
    ref, sf = make_module_pair(kind, 4, 6, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    w = torch.randn(3, 5, 6, dtype=torch.float64)
    grads = []
    for m in (ref, sf):
        m.zero_grad()
        xg = x.clone().requires_grad_(True)
        out, _ = m(xg)
        if loss == "sum":
            value = out.sum()
        elif loss == "mean":
            value = out.mean()
        elif loss == "transposed":
            value = (out.transpose(0, 1) * w).sum()
        else:
            value = (out[::2] * 3).sum() + out[1::2].square().sum()
        value.backward()
        grads.append([xg.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
