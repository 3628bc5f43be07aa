"""Bad arguments raise what torch.nn raises: same exception type, same message.

Every case runs the torch.nn call and the seqfast call and compares ``type(e)`` and ``str(e)``; torch is
the specification. Malformed PackedSequences and malformed raw-op arguments run in a subprocess so that a
crash (segfault, abort) fails the test instead of killing the test run.
"""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast.nn


def _capture(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
        return e
    return None


def assert_same_error(ref_fn, sf_fn):
    e_ref = _capture(ref_fn)
    assert e_ref is not None, "torch.nn did not raise: the test case is wrong"
    e_sf = _capture(sf_fn)
    assert e_sf is not None, f"seqfast did not raise; torch raised {type(e_ref).__name__}: {e_ref}"
    assert type(e_sf) is type(e_ref), f"seqfast raised {type(e_sf).__name__}: {e_sf}\ntorch raised {type(e_ref).__name__}: {e_ref}"
    assert str(e_sf) == str(e_ref)


TORCH = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
SEQFAST = {"LSTM": seqfast.nn.LSTM, "GRU": seqfast.nn.GRU, "RNN": seqfast.nn.RNN}
KINDS = list(TORCH)


def _pair(kind, *args, **kw):
    torch.manual_seed(0)
    ref = TORCH[kind](*args, **kw)
    sf = SEQFAST[kind](*args, **kw)
    sf.load_state_dict(ref.state_dict())
    return ref, sf


def _hx(kind, shape_h, shape_c=None, dtype=torch.float32):
    h = torch.zeros(shape_h, dtype=dtype)
    if kind == "LSTM":
        return (h, torch.zeros(shape_c if shape_c is not None else shape_h, dtype=dtype))
    return h


# ---------------------------------------------------------------------------------------------------
# Forward errors of LSTM / GRU / RNN
# ---------------------------------------------------------------------------------------------------
# (id, kinds, module kwargs, function (module) -> call)
L, Bt, I, H = 2, 3, 4, 6
X = torch.randn(5, Bt, I)
FORWARD_CASES = [
    ("input_size", KINDS, {}, lambda k, m: m(torch.randn(5, Bt, 7))),
    ("input_size_unbatched", KINDS, {}, lambda k, m: m(torch.randn(5, 7))),
    ("input_size_batch_first", KINDS, dict(batch_first=True), lambda k, m: m(torch.randn(Bt, 5, 7))),
    ("input_1d", KINDS, {}, lambda k, m: m(torch.randn(I))),
    ("input_4d", KINDS, {}, lambda k, m: m(torch.randn(5, Bt, I, 1))),
    ("input_0d", KINDS, {}, lambda k, m: m(torch.tensor(1.0))),
    ("seq_len_0", KINDS, {}, lambda k, m: m(torch.randn(0, Bt, I))),
    ("seq_len_0_unbatched", KINDS, {}, lambda k, m: m(torch.randn(0, I))),
    ("seq_len_0_batch_first", KINDS, dict(batch_first=True), lambda k, m: m(torch.randn(Bt, 0, I))),
    ("seq_len_0_with_hx", KINDS, {}, lambda k, m: m(torch.randn(0, Bt, I), _hx(k, (L, Bt, H)))),
    ("dtype_input_double", KINDS, {}, lambda k, m: m(X.double())),
    ("dtype_input_half", KINDS, {}, lambda k, m: m(X.half())),
    ("dtype_model_double", KINDS, dict(dtype=torch.float64), lambda k, m: m(X)),
    ("hx_batch", KINDS, {}, lambda k, m: m(X, _hx(k, (L, 2, H)))),
    ("hx_layers", KINDS, {}, lambda k, m: m(X, _hx(k, (1, Bt, H)))),
    ("hx_hidden", KINDS, {}, lambda k, m: m(X, _hx(k, (L, Bt, 5)))),
    ("hx_batch_first_not_applied", KINDS, dict(batch_first=True),
     lambda k, m: m(torch.randn(Bt, 5, I), _hx(k, (Bt, L, H)))),
    ("hx_bidirectional_layers", KINDS, dict(bidirectional=True), lambda k, m: m(X, _hx(k, (L, Bt, H)))),
    ("lstm_c_wrong", ["LSTM"], {}, lambda k, m: m(X, (torch.zeros(L, Bt, H), torch.zeros(L, Bt, 5)))),
    ("lstm_c_batch", ["LSTM"], {}, lambda k, m: m(X, (torch.zeros(L, Bt, H), torch.zeros(L, 2, H)))),
    ("lstm_proj_h_is_hidden", ["LSTM"], dict(proj_size=3), lambda k, m: m(X, _hx(k, (L, Bt, H)))),
    ("lstm_proj_c_is_proj", ["LSTM"], dict(proj_size=3), lambda k, m: m(X, _hx(k, (L, Bt, 3)))),
    ("batched_input_2d_hx", KINDS, {}, lambda k, m: m(X, _hx(k, (L, H)))),
    ("batched_input_mixed_hx", ["LSTM"], {}, lambda k, m: m(X, (torch.zeros(L, Bt, H), torch.zeros(L, H)))),
    ("unbatched_input_3d_hx", KINDS, {}, lambda k, m: m(torch.randn(5, I), _hx(k, (L, 1, H)))),
    ("unbatched_input_mixed_hx", ["LSTM"], {}, lambda k, m: m(torch.randn(5, I), (torch.zeros(L, H), torch.zeros(L, 1, H)))),
    ("unbatched_hx_wrong", KINDS, {}, lambda k, m: m(torch.randn(5, I), _hx(k, (L, 5)))),
    # packed input: torch checks GRU/RNN arguments in Python (clear messages); see below for LSTM
    ("packed_input_size", ["GRU", "RNN"], {}, lambda k, m: m(pack_padded_sequence(torch.randn(5, Bt, 7), [5, 3, 2]))),
    ("packed_dtype", ["GRU", "RNN"], {}, lambda k, m: m(pack_padded_sequence(X.double(), [5, 3, 2]))),
    ("packed_hx_batch", ["GRU", "RNN"], {}, lambda k, m: m(pack_padded_sequence(X, [5, 3, 2]), _hx(k, (L, 2, H)))),
    ("packed_hx_hidden", ["GRU", "RNN"], {}, lambda k, m: m(pack_padded_sequence(X, [5, 3, 2]), _hx(k, (L, Bt, 5)))),
]
FORWARD_PARAMS = [
    pytest.param(kind, kw, fn, id=f"{name}-{kind}") for name, kinds, kw, fn in FORWARD_CASES for kind in kinds
]


@pytest.mark.parametrize("kind,kw,fn", FORWARD_PARAMS)
def test_forward_error_matches_torch(kind, kw, fn):
    ref, sf = _pair(kind, I, H, num_layers=L, **kw)
    assert_same_error(lambda: fn(kind, ref), lambda: fn(kind, sf))


def test_forward_error_messages_are_the_documented_ones():
    """Anchor a few messages to the text in TORCH_RNN_FACTS.md, so a torch upgrade that changes them is
    noticed (the comparisons above would silently follow torch)."""
    _, sf = _pair("LSTM", I, H, num_layers=L)
    with pytest.raises(RuntimeError, match=r"^input.size\(-1\) must be equal to input_size. Expected 4, got 7$"):
        sf(torch.randn(5, Bt, 7))
    with pytest.raises(RuntimeError, match=r"^Expected hidden\[0\] size \(2, 3, 6\), got \[2, 2, 6\]$"):
        sf(X, _hx("LSTM", (L, 2, H), (L, Bt, H)))
    with pytest.raises(ValueError, match=r"^LSTM: Expected input to be 2D or 3D, got 4D instead$"):
        sf(torch.randn(5, Bt, I, 1))
    with pytest.raises(RuntimeError, match=r"^Expected sequence length to be larger than 0 in RNN$"):
        sf(torch.randn(0, Bt, I))
    with pytest.raises(ValueError, match=r"^RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"):
        sf(X.double())
    _, sf = _pair("GRU", I, H, num_layers=L)
    with pytest.raises(RuntimeError, match=r"^For batched 3-D input, hx should also be 3-D but got 2-D tensor$"):
        sf(X, torch.zeros(L, H))


@pytest.mark.parametrize("case", ["h_batch", "c_hidden", "input_size", "dtype"])
def test_packed_lstm_errors(case):
    """torch's LSTM skips its Python checks for packed input, so torch's own messages come from deep
    inside ATen (e.g. 'got an incorrect number of RNN parameters'). seqfast must raise the same type as
    torch, with either torch's message or the clear message torch gives for the padded case."""
    ref, sf = _pair("LSTM", I, H, num_layers=L)
    pk = pack_padded_sequence(X, [5, 3, 2])
    if case == "h_batch":
        call = lambda m: m(pk, _hx("LSTM", (L, 2, H), (L, Bt, H)))  # noqa: E731
        clear = "Expected hidden[0] size (2, 3, 6), got [2, 2, 6]"
    elif case == "c_hidden":
        call = lambda m: m(pk, _hx("LSTM", (L, Bt, H), (L, Bt, 5)))  # noqa: E731
        clear = "Expected hidden[1] size (2, 3, 6), got [2, 3, 5]"
    elif case == "input_size":
        call = lambda m: m(pack_padded_sequence(torch.randn(5, Bt, 7), [5, 3, 2]))  # noqa: E731
        clear = "input.size(-1) must be equal to input_size. Expected 4, got 7"
    else:
        call = lambda m: m(pack_padded_sequence(X.double(), [5, 3, 2]))  # noqa: E731
        clear = ("RNN input dtype (torch.float64) does not match weight dtype (torch.float32). "
                 "Convert input: input.to(torch.float32), or convert model: model.to(torch.float64)")
    e_ref = _capture(lambda: call(ref))
    assert e_ref is not None
    e_sf = _capture(lambda: call(sf))
    assert e_sf is not None, "seqfast accepted a malformed packed call"
    accepted = {(type(e_ref), str(e_ref)), (RuntimeError, clear), (ValueError, clear)}
    assert (type(e_sf), str(e_sf)) in accepted, f"{type(e_sf).__name__}: {e_sf}"


@pytest.mark.parametrize("kind", KINDS)
def test_hx_dtype_mismatch_raises(kind):
    """torch raises from deep inside its kernels (the message depends on the backend that runs), so only
    require that seqfast raises too, with a non-empty message, rather than silently casting."""
    ref, sf = _pair(kind, I, H, num_layers=L)
    hx = _hx(kind, (L, Bt, H), dtype=torch.float64)
    assert _capture(lambda: ref(X, hx)) is not None
    e = _capture(lambda: sf(X, hx))
    assert isinstance(e, (RuntimeError, ValueError, TypeError)), repr(e)
    assert str(e)


# ---------------------------------------------------------------------------------------------------
# Constructor errors
# ---------------------------------------------------------------------------------------------------
CTOR_CASES = [
    ("dropout_above_1", KINDS, (I, H), dict(num_layers=2, dropout=1.5)),
    ("dropout_negative", KINDS, (I, H), dict(num_layers=2, dropout=-0.1)),
    ("dropout_string", KINDS, (I, H), dict(num_layers=2, dropout="a")),
    ("dropout_bool", KINDS, (I, H), dict(num_layers=2, dropout=True)),
    ("dropout_none", KINDS, (I, H), dict(num_layers=2, dropout=None)),
    ("bias_int", KINDS, (I, H), dict(bias=1)),
    ("batch_first_int", KINDS, (I, H), dict(batch_first=1)),
    ("hidden_size_0", KINDS, (I, 0), {}),
    ("hidden_size_negative", KINDS, (I, -1), {}),
    ("hidden_size_float", KINDS, (I, 6.0), {}),
    ("input_size_0", KINDS, (0, H), {}),
    ("input_size_float", KINDS, (4.0, H), {}),
    ("num_layers_0", KINDS, (I, H), dict(num_layers=0)),
    ("num_layers_float", KINDS, (I, H), dict(num_layers=1.5)),
    ("proj_size_negative", ["LSTM"], (I, H), dict(proj_size=-1)),
    ("proj_size_equal_hidden", ["LSTM"], (I, H), dict(proj_size=H)),
    ("proj_size_above_hidden", ["LSTM"], (I, H), dict(proj_size=H + 1)),
    ("proj_size_given", ["GRU", "RNN"], (I, H), dict(proj_size=2)),
    ("proj_size_zero_given", ["GRU", "RNN"], (I, H), dict(proj_size=0)),
    ("nonlinearity_unknown", ["RNN"], (I, H), dict(nonlinearity="sigmoid")),
    ("nonlinearity_positional", ["RNN"], (I, H, 1, "gelu"), {}),
    ("unexpected_kwarg", KINDS, (I, H), dict(hiden_size=3)),
]


@pytest.mark.parametrize(
    "kind,args,kw",
    [pytest.param(k, a, kw, id=f"{n}-{k}") for n, kinds, a, kw in CTOR_CASES for k in kinds],
)
def test_constructor_error_matches_torch(kind, args, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_error(lambda: TORCH[kind](*args, **kw), lambda: SEQFAST[kind](*args, **kw))


def test_constructor_documented_messages():
    with pytest.raises(ValueError, match=r"^dropout should be a number in range \[0, 1\] representing"):
        seqfast.nn.LSTM(I, H, num_layers=2, dropout=2)
    with pytest.raises(TypeError, match=r"^bias should be of type bool, got: int$"):
        seqfast.nn.GRU(I, H, bias=1)
    with pytest.raises(ValueError, match=r"^proj_size has to be smaller than hidden_size$"):
        seqfast.nn.LSTM(I, H, proj_size=H)
    with pytest.raises(ValueError, match=r"^proj_size argument is only supported for LSTM, not RNN or GRU$"):
        seqfast.nn.RNN(I, H, proj_size=1)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_warning_single_layer(kind):
    with pytest.warns(UserWarning) as rec_ref:
        TORCH[kind](I, H, dropout=0.5)
    with pytest.warns(UserWarning) as rec_sf:
        SEQFAST[kind](I, H, dropout=0.5)
    msgs_ref = [str(w.message) for w in rec_ref]
    msgs_sf = [str(w.message) for w in rec_sf]
    assert msgs_sf == msgs_ref
    assert "non-zero dropout expects num_layers greater than 1" in msgs_sf[0]


@pytest.mark.parametrize("kind", KINDS)
def test_no_warning_for_valid_construction(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SEQFAST[kind](I, H, num_layers=2, dropout=0.5)
        SEQFAST[kind](I, H)


# ---------------------------------------------------------------------------------------------------
# Cell errors
# ---------------------------------------------------------------------------------------------------
CELL_TORCH = {"LSTMCell": torch.nn.LSTMCell, "GRUCell": torch.nn.GRUCell, "RNNCell": torch.nn.RNNCell}
CELL_SEQFAST = {"LSTMCell": seqfast.nn.LSTMCell, "GRUCell": seqfast.nn.GRUCell, "RNNCell": seqfast.nn.RNNCell}


def _chx(cell, *shape, c_shape=None):
    h = torch.zeros(shape)
    if cell == "LSTMCell":
        return (h, torch.zeros(c_shape or shape))
    return h


CELL_CASES = [
    ("input_3d", lambda c, m: m(torch.randn(3, 2, 4))),
    ("input_0d", lambda c, m: m(torch.tensor(1.0))),
    ("hx_4d", lambda c, m: m(torch.randn(3, 4), _chx(c, 3, 1, 1, 6))),
    ("hx_3d", lambda c, m: m(torch.randn(3, 4), _chx(c, 1, 3, 6))),
    ("input_1d_hx_2d", lambda c, m: m(torch.randn(4), _chx(c, 1, 6))),
    ("input_2d_hx_1d", lambda c, m: m(torch.randn(3, 4), _chx(c, 6))),
    ("input_size", lambda c, m: m(torch.randn(3, 5), _chx(c, 3, 6))),
    ("input_size_no_hx", lambda c, m: m(torch.randn(3, 5))),
    ("input_size_1d", lambda c, m: m(torch.randn(5))),
    ("batch_mismatch", lambda c, m: m(torch.randn(3, 4), _chx(c, 2, 6))),
    ("hidden_size", lambda c, m: m(torch.randn(3, 4), _chx(c, 3, 5))),
]
LSTM_CELL_CASES = [
    ("c_hidden_size", lambda c, m: m(torch.randn(3, 4), _chx(c, 3, 6, c_shape=(3, 5)))),
    ("c_batch", lambda c, m: m(torch.randn(3, 4), _chx(c, 3, 6, c_shape=(2, 6)))),
    ("c_1d", lambda c, m: m(torch.randn(3, 4), _chx(c, 3, 6, c_shape=(6,)))),
]


@pytest.mark.parametrize(
    "cell,fn",
    [pytest.param(c, fn, id=f"{n}-{c}") for n, fn in CELL_CASES for c in CELL_TORCH]
    + [pytest.param("LSTMCell", fn, id=f"{n}-LSTMCell") for n, fn in LSTM_CELL_CASES],
)
def test_cell_error_matches_torch(cell, fn):
    torch.manual_seed(0)
    ref = CELL_TORCH[cell](4, 6)
    sf = CELL_SEQFAST[cell](4, 6)
    assert_same_error(lambda: fn(cell, ref), lambda: fn(cell, sf))


@pytest.mark.parametrize("cell", list(CELL_TORCH))
def test_cell_dtype_mismatch_raises(cell):
    """torch's message comes from its matmul; require the same exception type."""
    torch.manual_seed(0)
    ref = CELL_TORCH[cell](4, 6)
    sf = CELL_SEQFAST[cell](4, 6)
    x = torch.randn(3, 4, dtype=torch.float64)
    e_ref, e_sf = _capture(lambda: ref(x)), _capture(lambda: sf(x))
    assert e_ref is not None and e_sf is not None, f"seqfast accepted float64 input: {e_sf!r}"
    assert type(e_sf) is type(e_ref) and str(e_sf)


@pytest.mark.parametrize(
    "cell,args,kw",
    [("RNNCell", (4, 6), dict(nonlinearity="gelu")), ("RNNCell", (4, 6, True, "sigmoid"), {}),
     ("LSTMCell", (4, -1), {}), ("GRUCell", (-2, 6), {})],
    ids=["nonlinearity", "nonlinearity_positional", "lstm_negative_hidden", "gru_negative_input"],
)
def test_cell_construction_or_first_call_error_matches_torch(cell, args, kw):
    """torch's RNNCell accepts an unknown nonlinearity and fails on the first call; negative sizes fail in
    construction. Either way seqfast must fail the same way at the same point."""

    def build_and_call(cls):
        m = cls(*args, **kw)
        return m(torch.randn(3, 4))

    e_ref_ctor = _capture(lambda: CELL_TORCH[cell](*args, **kw))
    e_sf_ctor = _capture(lambda: CELL_SEQFAST[cell](*args, **kw))
    assert (e_ref_ctor is None) == (e_sf_ctor is None), (e_ref_ctor, e_sf_ctor)
    assert_same_error(lambda: build_and_call(CELL_TORCH[cell]), lambda: build_and_call(CELL_SEQFAST[cell]))


# ---------------------------------------------------------------------------------------------------
# Malformed packed sequences and raw-op arguments: raise, never crash (run in a subprocess)
# ---------------------------------------------------------------------------------------------------
_SUBPROCESS_PRELUDE = textwrap.dedent(
    """
    import json, sys, traceback
    import torch
    import seqfast, seqfast.nn
    from torch.nn.utils.rnn import PackedSequence

    def report(name, fn, ref=None):
        print(json.dumps({"start": name}), flush=True)
        try:
            got = fn()
        except Exception as e:
            print(json.dumps({"name": name, "raised": type(e).__name__, "msg": str(e)[:300]}), flush=True)
            return
        rec = {"name": name, "raised": None}
        if ref is not None:
            try:
                want = ref()
                rec["equal_to_torch"] = all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(got, want))
            except Exception as e:
                rec["equal_to_torch"] = None
                rec["torch_raised"] = type(e).__name__
        print(json.dumps(rec), flush=True)
    """
)

# batch_sizes for 6 rows of data; "torch_raises": torch.nn rejects it, so seqfast must raise too.
BAD_BATCH_SIZES = {
    "increasing": ([1, 2, 3], True),
    "sum_more_than_rows": ([3, 3, 3], True),
    "zero_in_middle": ([3, 0, 3], True),
    "negative": ([3, -1], True),
    "empty": ([], True),
    "zero_at_end": ([3, 3, 0], False),
    "sum_less_than_rows": ([2, 1], False),
}

_MODULE_SCRIPT = _SUBPROCESS_PRELUDE + textwrap.dedent(
    """
    BAD = json.loads(sys.argv[1])
    for kind in ["LSTM", "GRU", "RNN"]:
        for dtype in [torch.float32, torch.float64]:
            for bidirectional in [False, True]:
                torch.manual_seed(0)
                ref = getattr(torch.nn, kind)(4, 5, bidirectional=bidirectional).to(dtype)
                sf = getattr(seqfast.nn, kind)(4, 5, bidirectional=bidirectional).to(dtype)
                sf.load_state_dict(ref.state_dict())
                for case, (bs, _) in BAD.items():
                    data = torch.randn(6, 4, dtype=dtype, requires_grad=True)
                    ps = PackedSequence(data, torch.tensor(bs, dtype=torch.int64))

                    def run(m, ps=ps, data=data):
                        out, hidden = m(ps)
                        h = hidden[0] if kind == "LSTM" else hidden
                        (out.data.sum() + h.sum()).backward()
                        return out.data.detach(), h.detach()

                    d = "bi" if bidirectional else "uni"
                    report(f"{case}-{kind}-{dtype}-{d}", lambda: run(sf), lambda: run(ref))
                # float batch_sizes, and a hidden state whose batch disagrees with batch_sizes[0]
                ps = PackedSequence(torch.randn(6, 4, dtype=dtype), torch.tensor([3.0, 3.0]))
                report(f"float_batch_sizes-{kind}-{dtype}-{bidirectional}", lambda: sf(ps))
                D = 2 if bidirectional else 1
                ps = PackedSequence(torch.randn(6, 4, dtype=dtype), torch.tensor([3, 2, 1]))
                h = torch.zeros(D, 5, 5, dtype=dtype)
                hx = (h, torch.zeros(D, 5, 5, dtype=dtype)) if kind == "LSTM" else h
                report(f"hx_batch_mismatch-{kind}-{dtype}-{bidirectional}", lambda: sf(ps, hx))
    print("DONE", flush=True)
    """
)

_OP_SCRIPT = _SUBPROCESS_PRELUDE + textwrap.dedent(
    """
    fwd = torch.ops.seqfast.recurrent_layer_forward
    bwd = torch.ops.seqfast.recurrent_layer_backward
    G = {0: 4, 1: 3, 2: 1, 3: 1}
    I, H, B, T = 4, 5, 3, 4
    for mode in [0, 1, 2, 3]:
        for dtype in [torch.float32, torch.float64]:
            g = G[mode]
            kw = dict(dtype=dtype)
            x = torch.randn(T, B, I, **kw)
            xp = torch.randn(6, I, **kw)
            bs = torch.tensor([3, 2, 1])
            hx = torch.randn(B, H, **kw)
            cx = torch.randn(B, H, **kw) if mode == 0 else None
            w_ih, w_hh = torch.randn(g * H, I, **kw), torch.randn(g * H, H, **kw)
            b_ih, b_hh = torch.randn(g * H, **kw), torch.randn(g * H, **kw)
            tag = f"{mode}-{dtype}"

            def F(inp=x, batch_sizes=None, hx=hx, cx=cx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=None,
                  mode=mode, reverse=False, training=True):
                return lambda: fwd(inp, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training)

            for rev in [False, True]:
                for case, bad in [("increasing", [1, 2, 3]), ("sum_more", [3, 3, 3]),
                                  ("zero", [3, 0, 3]), ("negative", [3, -1, 4]), ("empty", []),
                                  ("first_above_hx", [4, 1, 1])]:
                    report(f"bs_{case}-{tag}-rev{rev}", F(inp=xp, batch_sizes=torch.tensor(bad, dtype=torch.int64), reverse=rev))
            report(f"bs_int32-{tag}", F(inp=xp, batch_sizes=bs.to(torch.int32)))
            report(f"bs_2d-{tag}", F(inp=xp, batch_sizes=bs.view(1, 3)))
            report(f"packed_input_3d-{tag}", F(inp=x, batch_sizes=bs))
            report(f"padded_input_2d-{tag}", F(inp=xp))
            report(f"input_size-{tag}", F(inp=torch.randn(T, B, I + 1, **kw)))
            report(f"hx_batch-{tag}", F(hx=torch.randn(B + 1, H, **kw)))
            report(f"hx_size-{tag}", F(hx=torch.randn(B, H + 1, **kw)))
            report(f"hx_1d-{tag}", F(hx=torch.randn(H, **kw)))
            report(f"w_hh_shape-{tag}", F(w_hh=torch.randn(g * H, H + 1, **kw)))
            report(f"w_hh_rows-{tag}", F(w_hh=torch.randn(g * H + 1, H, **kw)))
            report(f"w_ih_rows-{tag}", F(w_ih=torch.randn(g * H - 1, I, **kw)))
            report(f"b_ih_size-{tag}", F(b_ih=torch.randn(g * H + 2, **kw)))
            report(f"b_hh_2d-{tag}", F(b_hh=torch.randn(1, g * H, **kw)))
            report(f"mode_minus1-{tag}", F(mode=-1))
            report(f"mode_4-{tag}", F(mode=4))
            other = torch.float64 if dtype == torch.float32 else torch.float32
            report(f"dtype_weights-{tag}", F(w_ih=w_ih.to(other), w_hh=w_hh.to(other)))
            report(f"dtype_hx-{tag}", F(hx=hx.to(other)))
            report(f"int_input-{tag}", F(inp=x.to(torch.int64)))
            if mode == 0:
                report(f"lstm_cx_none-{tag}", F(cx=None))
                report(f"lstm_cx_shape-{tag}", F(cx=torch.randn(B, H + 1, **kw)))
                report(f"lstm_w_hr_cols-{tag}", F(w_hr=torch.randn(2, H + 1, **kw), hx=torch.randn(B, 2, **kw),
                                                  w_hh=torch.randn(g * H, 2, **kw)))
                report(f"lstm_w_hr_hx-{tag}", F(w_hr=torch.randn(2, H, **kw)))
            else:
                report(f"w_hr_non_lstm-{tag}", F(w_hr=torch.randn(2, H, **kw), hx=torch.randn(B, 2, **kw),
                                                 w_hh=torch.randn(g * H, 2, **kw)))
            # backward with inconsistent arguments
            out, hy, cy, ws = fwd(x, None, hx, cx, w_ih, w_hh, b_ih, b_hh, None, mode, False, True)
            gcy = torch.randn_like(cy) if mode == 0 else None

            def Bk(go=torch.randn_like(out), ghy=torch.randn_like(hy), gcy=gcy, ws=ws, out=out, inp=x, mode=mode):
                return lambda: bwd(go, ghy, gcy, inp, None, hx, cx, w_ih, w_hh, b_ih, b_hh, None, out, ws, mode, False)

            report(f"bwd_ok-{tag}", Bk())
            report(f"bwd_workspace_truncated-{tag}", Bk(ws=ws[: ws.numel() // 2]))
            report(f"bwd_workspace_empty-{tag}", Bk(ws=ws[:0]))
            report(f"bwd_grad_output_shape-{tag}", Bk(go=torch.randn(T, B + 1, H, **kw)))
            report(f"bwd_grad_hy_shape-{tag}", Bk(ghy=torch.randn(B, H + 1, **kw)))
            report(f"bwd_output_shape-{tag}", Bk(out=out[:-1]))
            report(f"bwd_input_shape-{tag}", Bk(inp=x[:-1]))
            # undetectable misuse (a packed forward whose backward gets other batch_sizes with the same total):
            # garbage is acceptable, a crash is not
            outp, hyp, cyp, wsp = fwd(xp, bs, hx, cx, w_ih, w_hh, b_ih, b_hh, None, mode, False, True)
            report(f"nocrash_bwd_packed_other_batch_sizes-{tag}",
                   lambda: bwd(torch.randn_like(outp), torch.randn_like(hyp), torch.randn_like(cyp) if mode == 0 else None,
                               xp, torch.tensor([3, 3]), hx, cx, w_ih, w_hh, b_ih, b_hh, None, outp, wsp, mode, False))
    print("DONE", flush=True)
    """
)


def _run_script(script, *args):
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    records, started = {}, []
    for line in proc.stdout.splitlines():
        if line == "DONE":
            continue
        rec = json.loads(line)
        if "start" in rec:
            started.append(rec["start"])
        else:
            records[rec["name"]] = rec
    return proc, records, started


def _assert_completed(proc, records, started):
    crashed_in = [s for s in started if s not in records]
    assert proc.returncode == 0 and "DONE" in proc.stdout, (
        f"subprocess died (returncode {proc.returncode}) in case {crashed_in[-1:] or '?'}\n"
        f"stderr tail:\n{proc.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def bad_packed_results():
    arg = json.dumps({k: v for k, v in BAD_BATCH_SIZES.items()})
    return _run_script(_MODULE_SCRIPT, arg)


@pytest.fixture(scope="module")
def bad_op_results():
    return _run_script(_OP_SCRIPT)


def test_bad_packed_sequences_never_crash(bad_packed_results):
    proc, records, started = bad_packed_results
    _assert_completed(proc, records, started)
    assert len(records) == 3 * 2 * 2 * (len(BAD_BATCH_SIZES) + 2)
    problems = []
    for name, rec in records.items():
        case = name.split("-")[0]
        must_raise = case in ("float_batch_sizes", "hx_batch_mismatch") or BAD_BATCH_SIZES[case][1]
        if must_raise:
            if rec["raised"] is None or not rec["msg"]:
                problems.append(f"{name}: no exception (or empty message): {rec}")
        elif rec["raised"] is None and rec.get("equal_to_torch") is not True:
            problems.append(f"{name}: accepted but the result differs from torch.nn's: {rec}")
    assert not problems, "\n".join(problems)


def test_bad_raw_op_arguments_never_crash(bad_op_results):
    proc, records, started = bad_op_results
    _assert_completed(proc, records, started)
    problems = []
    for name, rec in records.items():
        if name.startswith("nocrash_"):
            continue
        if name.startswith("bwd_ok"):
            if rec["raised"] is not None:
                problems.append(f"{name}: a valid backward call raised: {rec}")
        elif rec["raised"] is None or not rec["msg"]:
            problems.append(f"{name}: accepted malformed arguments: {rec}")
    assert not problems, "\n".join(problems)
