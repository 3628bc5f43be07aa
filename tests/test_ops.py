"""The registered ops: opcheck, gradcheck, agreement with a torch.nn layer, and the training flag."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import seqfast
import seqfast.ops

MODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
GATES = {0: 4, 1: 3, 2: 1, 3: 1}
FWD = torch.ops.seqfast.recurrent_layer_forward
BWD = torch.ops.seqfast.recurrent_layer_backward
BATCH_SIZES = [3, 2, 2, 1]  # lengths 4, 3, 1 -> batch_sizes (non-increasing, ends in 1)


def make_args(mode, layout, bias=True, proj=0, T=4, B=3, I=3, H=4, dtype=torch.float64, requires_grad=False,
              training=True, reverse=False, seed=0):
    """Arguments of recurrent_layer_forward, in schema order."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]
    P = proj or H

    def rnd(*shape, scale=1.0):
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    if layout == "padded":
        inp, batch_sizes = rnd(T, B, I), None
    else:
        assert B == BATCH_SIZES[0] and T == len(BATCH_SIZES)
        batch_sizes = torch.tensor(BATCH_SIZES, dtype=torch.int64)
        inp = rnd(sum(BATCH_SIZES), I)
    hx = rnd(B, P)
    cx = rnd(B, H) if mode == 0 else None
    s = H ** -0.5
    w_ih, w_hh = rnd(G * H, I, scale=s), rnd(G * H, P, scale=s)
    b_ih = rnd(G * H, scale=s) if bias else None
    b_hh = rnd(G * H, scale=s) if bias else None
    w_hr = rnd(P, H, scale=s) if proj else None
    return [inp, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, training]


# ---------------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------------
OPCHECK_CASES = [
    (name, layout, bias, proj)
    for name in MODES
    for layout in ("padded", "packed")
    for bias in (True, False)
    for proj in ((0, 2) if name == "lstm" else (0,))
]


def _case_id(c):
    name, layout, bias, proj = c
    return f"{name}-{layout}-{'bias' if bias else 'nobias'}" + (f"-proj{proj}" if proj else "")


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_id)
def test_opcheck_forward_training(case):
    name, layout, bias, proj = case
    args = make_args(MODES[name], layout, bias, proj, requires_grad=True, training=True, reverse=(layout == "packed"))
    out, hy, cy, ws = FWD(*args)
    assert ws.numel() > 0, "training=True must save a workspace"
    torch.library.opcheck(FWD, args)


@pytest.mark.parametrize("case", OPCHECK_CASES[::2], ids=_case_id)
def test_opcheck_forward_inference(case):
    name, layout, bias, proj = case
    args = make_args(MODES[name], layout, bias, proj, training=False)
    out, hy, cy, ws = FWD(*args)
    assert ws.numel() == 0, "training=False must not save a workspace"
    if MODES[name] != 0:
        assert cy.numel() == 0, "cy must be empty for GRU/RNN"
    torch.library.opcheck(FWD, args)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_id)
def test_opcheck_backward(case):
    name, layout, bias, proj = case
    mode = MODES[name]
    reverse = layout == "padded"
    args = make_args(mode, layout, bias, proj, training=True, reverse=reverse)
    inp, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = args[:9]
    out, hy, cy, ws = FWD(*args)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    ghy = torch.randn(hy.shape, generator=g, dtype=hy.dtype)
    gcy = torch.randn(cy.shape, generator=g, dtype=cy.dtype) if mode == 0 else None
    bargs = [go, ghy, gcy, inp, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, out, ws, mode, reverse]
    grads = BWD(*bargs)
    assert len(grads) == 8
    for gr, t, n in zip(grads, [inp, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr],
                        ["input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]):
        if t is None:
            assert gr.numel() == 0, f"grad of absent {n} must be empty"
        else:
            assert gr.shape == t.shape, n
    torch.library.opcheck(BWD, bargs)


# ---------------------------------------------------------------------------------------------------
# Agreement with a one-layer torch.nn module
# ---------------------------------------------------------------------------------------------------
def _torch_layer(mode, I, H, proj, bias, reverse, w):
    """A torch.nn module whose (forward or reverse) direction carries the given weights."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    kw = dict(bias=bias, bidirectional=reverse)
    if mode == 0:
        m = torch.nn.LSTM(I, H, proj_size=proj, **kw)
    elif mode == 1:
        m = torch.nn.GRU(I, H, **kw)
    else:
        m = torch.nn.RNN(I, H, nonlinearity="tanh" if mode == 2 else "relu", **kw)
    m = m.double()
    sfx = "_l0_reverse" if reverse else "_l0"
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["weight_ih" + sfx], sd["weight_hh" + sfx] = w_ih.detach(), w_hh.detach()
    if bias:
        sd["bias_ih" + sfx], sd["bias_hh" + sfx] = b_ih.detach(), b_hh.detach()
    if proj:
        sd["weight_hr" + sfx] = w_hr.detach()
    m.load_state_dict(sd)
    return m


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(MODES) + ["lstm_proj"])
def test_op_matches_torch_nn_layer(name, layout, reverse):
    mode = MODES[name.replace("_proj", "")]
    proj = 2 if name == "lstm_proj" else 0
    I, H = 3, 4
    args = make_args(mode, layout, True, proj, I=I, H=H, training=False, reverse=reverse)
    inp, batch_sizes, hx, cx = args[:4]
    out, hy, cy, _ = FWD(*args)
    m = _torch_layer(mode, I, H, proj, True, reverse, args[4:9])
    D = 2 if reverse else 1
    P = proj or H
    B = hx.size(0)
    # the other direction of a bidirectional reference gets zero states; only ours is compared
    h0 = torch.zeros(D, B, P, dtype=torch.float64)
    h0[D - 1] = hx
    c0 = None
    if mode == 0:
        c0 = torch.zeros(D, B, H, dtype=torch.float64)
        c0[D - 1] = cx
    x = PackedSequence(inp, batch_sizes) if layout == "packed" else inp
    with torch.no_grad():
        r_out, r_hidden = m(x, (h0, c0) if mode == 0 else h0)
    r_out = r_out.data if layout == "packed" else r_out
    tol = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out, r_out[..., (D - 1) * P:], **tol)
    r_h = r_hidden[0] if mode == 0 else r_hidden
    torch.testing.assert_close(hy, r_h[D - 1], **tol)
    if mode == 0:
        torch.testing.assert_close(cy, r_hidden[1][D - 1], **tol)


# ---------------------------------------------------------------------------------------------------
# gradcheck through seqfast.ops.recurrent_layer
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(MODES) + ["lstm_proj", "gru_nobias"])
def test_gradcheck(name, layout, reverse):
    mode = MODES[name.split("_proj")[0].split("_nobias")[0]]
    proj = 2 if name == "lstm_proj" else 0
    bias = name != "gru_nobias"
    T, B = (4, 3)
    args = make_args(mode, layout, bias, proj, T=T, B=B, I=2, H=3, requires_grad=True, reverse=reverse, seed=1)
    batch_sizes = args[1]
    diff_idx = [i for i in (0, 2, 3, 4, 5, 6, 7, 8) if args[i] is not None]
    diff = [args[i] for i in diff_idx]

    def fn(*ts):
        a = list(args)
        for i, t in zip(diff_idx, ts):
            a[i] = t
        a[1] = batch_sizes
        a[11] = True
        out, hy, cy = seqfast.ops.recurrent_layer(*a)
        return (out, hy, cy) if mode == 0 else (out, hy)

    assert torch.autograd.gradcheck(fn, diff, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_sees_every_input():
    """Guard against a vacuous gradcheck: every differentiable argument gets a nonzero gradient."""
    for mode in MODES.values():
        args = make_args(mode, "packed", True, 2 if mode == 0 else 0, requires_grad=True, reverse=True)
        out, hy, cy = seqfast.ops.recurrent_layer(*args)
        loss = out.sum() + hy.sum() + (cy.sum() if mode == 0 else 0)
        names = ["input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
        tensors = [args[i] for i in (0, 2, 3, 4, 5, 6, 7, 8)]
        present = [(n, t) for n, t in zip(names, tensors) if t is not None]
        grads = torch.autograd.grad(loss, [t for _, t in present])
        for (n, _), g in zip(present, grads):
            assert g.abs().sum() > 0, f"mode {mode}: zero gradient for {n}"


# ---------------------------------------------------------------------------------------------------
# training=False
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODES))
def test_training_false_under_autograd_still_differentiates(name):
    """training=False is what a torch.jit.trace graph holds whatever the grad mode; when gradients are
    needed the op's autograd kernel saves the workspace anyway, so the gradients are those of
    training=True."""
    mode = MODES[name]
    grads = []
    for training in (False, True):
        args = make_args(mode, "padded", True, 0, requires_grad=True, training=training)
        out, hy, cy = seqfast.ops.recurrent_layer(*args)
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads.append(torch.autograd.grad(out.sum() + hy.sum(), inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODES))
def test_inference_forward_equals_training_forward(name):
    mode = MODES[name]
    a_train = make_args(mode, "packed", True, 0, training=True, reverse=True)
    a_inf = make_args(mode, "packed", True, 0, training=False, reverse=True)
    r_train, r_inf = FWD(*a_train), FWD(*a_inf)
    for x, y in zip(r_train[:3], r_inf[:3]):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_workspace_is_flat():
    for mode in MODES.values():
        ws = FWD(*make_args(mode, "padded", training=True))[3]
        assert ws.dim() == 1 and ws.numel() > 0


def test_import_seqfast_first_in_a_fresh_process():
    """``import seqfast`` must work as the first import of a program (the extension links against
    libc10/libtorch, which are only loadable once torch is imported; seqfast has to import torch itself)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import seqfast, torch; print(torch.ops.seqfast.recurrent_layer_forward)"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("what", ["grad_cy_shape", "grad_output_dtype", "output_shape", "workspace_size"])
def test_backward_op_rejects_malformed_inputs(what):
    """Hand-made backward arguments that do not match the forward are errors, never reads or writes out
    of bounds (grad_cy is copied into the running (B, H) cell-state gradient)."""
    args = make_args(0, "packed", True, 0, training=True)
    out, hy, cy, ws = FWD(*args)
    input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse, _ = args
    bargs = dict(grad_output=torch.ones_like(out), grad_hy=torch.ones_like(hy), grad_cy=torch.ones_like(cy),
                 output=out, workspace=ws)
    if what == "grad_cy_shape":
        bargs["grad_cy"] = torch.ones(cy.shape[0] + 5, cy.shape[1], dtype=cy.dtype)
    elif what == "grad_output_dtype":
        bargs["grad_output"] = bargs["grad_output"].float()
    elif what == "output_shape":
        bargs["output"] = out[:-1]
    else:
        bargs["workspace"] = ws[:-1]
    with pytest.raises(RuntimeError, match="recurrent_layer_backward"):
        BWD(bargs["grad_output"], bargs["grad_hy"], bargs["grad_cy"], input, batch_sizes, hx, cx, w_ih, w_hh,
            b_ih, b_hh, w_hr, bargs["output"], bargs["workspace"], mode, reverse)
