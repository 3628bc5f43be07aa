"""bfloat16 on the CPU: under torch.autocast("cpu", dtype=torch.bfloat16) and for .bfloat16() modules.

torch.nn is the specification for dtypes (computed live, so the tests follow torch if it changes), and
for accuracy the rule of FlashAttention's tests: against a float64 reference computed from the same
weights and inputs, seqfast's max-abs error (outputs, final states, every gradient) must be at most 2x
torch.nn's own error under the same autocast on the same inputs, plus a small absolute floor
(FLOOR x the reference's scale) so that two near-zero errors do not make the comparison flaky.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
import seqfast.nn

BF16 = torch.bfloat16
FLOOR = 1e-3  # absolute floor of the accuracy bound, relative to max |reference|
RATIO = 2.0

# H = 40 runs the per-row gate passes (H >= 32) and a partial column block of the bf16 GEMM (G*H not a
# multiple of 32 for GRU/RNN); B = 48 gives every layer call >= 256 token rows, the size from which the
# bf16 micro-kernel is used (bf16_gemm.h). The cells (B = 4: at::mm in bf16) use H_CELL = 16, the
# gate-major small-H passes.
T, B, I, H, PROJ, H_CELL = 9, 48, 10, 40, 8, 16
LENGTHS = [9] * 12 + [7] * 12 + [5] * 12 + [3] * 12  # 288 tokens


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def twins(kind, **kwargs):
    """(torch module, seqfast module) with the same float32 weights."""
    cls = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN", "LSTMCell": "LSTMCell", "GRUCell": "GRUCell",
           "RNNCell": "RNNCell"}[kind]
    ref = getattr(torch.nn, cls)(**kwargs)
    ours = getattr(seqfast.nn, cls)(**kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def data_of(x):
    return x.data if isinstance(x, PackedSequence) else x


def flat_outputs(result):
    """[output, h_n] or [output, h_n, c_n] of a layer's result (output as a tensor)."""
    out, hidden = result
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return [data_of(out)] + hidden


# ---------------------------------------------------------------------------------------------------
# 1. The crash of issue 9: kernels must not see the caller's autocast state.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_mid_size_layer_runs(kind, grad):
    """(20, 8, 32) -> 48 used to raise 'expected scalar type Float but found BFloat16' (an at::addmm
    inside the kernel came back in bfloat16)."""
    torch.manual_seed(0)
    ref, ours = twins(kind, input_size=32, hidden_size=48)
    x = torch.randn(20, 8, 32, requires_grad=grad)
    with torch.set_grad_enabled(grad), autocast():
        out, _ = ours(x)
        expected, _ = ref(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=0.05, rtol=0)
    if grad:
        out.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("bands", ["1", "2"])
def test_float32_backward_inside_autocast(bands, monkeypatch):
    """A float32 forward whose backward runs inside an autocast region: the backward op has no autocast
    kernel (autocast falls through), so its own GEMMs, and those of the row-band worker threads, must
    be immune to autocast and give the float32 gradients."""
    monkeypatch.setenv("SEQFAST_ROW_BANDS", bands)
    torch.manual_seed(0)
    ref, ours = twins("LSTM", input_size=32, hidden_size=48)
    x = torch.randn(20, 8, 32)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = ours(x_ours)
    expected, _ = ref(x_ref)
    with autocast():
        out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=5e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, atol=5e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------
# 2. Output dtypes under autocast: the same as torch.nn's, computed live.
# ---------------------------------------------------------------------------------------------------
LAYER_GRID = [
    (kind, layers, bidir, packed, hx_given, proj)
    for kind in ("LSTM", "GRU", "RNN")
    for layers, bidir, packed, hx_given in itertools.product((1, 2), (False, True), (False, True), (False, True))
    for proj in ((0, PROJ) if kind == "LSTM" else (0,))
]


def layer_case(kind, layers, bidir, packed, hx_given, proj, seed=0):
    """Modules, input and initial state of one grid point (float32)."""
    torch.manual_seed(seed)
    kwargs = dict(input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir)
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = twins(kind, **kwargs)
    x = torch.randn(T, B, I)
    D = 2 if bidir else 1
    hx = None
    if hx_given:
        h0 = torch.randn(D * layers, B, proj or H) * 0.5
        hx = (h0, torch.randn(D * layers, B, H) * 0.5) if kind == "LSTM" else h0
    return ref, ours, x, hx


def run_layer(module, x, hx, packed, grads=None):
    """Runs one layer (optionally differentiating); returns its outputs and the gradients of
    x, the initial states and every parameter, as lists of float64 tensors."""
    x = x.detach().clone().requires_grad_(grads is not None)
    states = []
    if hx is not None:
        states = [h.detach().clone().requires_grad_(grads is not None) for h in (hx if isinstance(hx, tuple) else (hx,))]
    arg_hx = None if hx is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    inp = pack_padded_sequence(x, LENGTHS) if packed else x
    result = module(inp) if arg_hx is None else module(inp, arg_hx)
    outs = flat_outputs(result)
    if grads is None:
        return outs, []
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads))
    params = list(module.parameters())
    got = torch.autograd.grad(loss, [x] + states + params)
    return outs, list(got)


@pytest.mark.parametrize("kind,layers,bidir,packed,hx_given,proj", LAYER_GRID)
def test_autocast_dtypes_match_torch(kind, layers, bidir, packed, hx_given, proj):
    ref, ours, x, hx = layer_case(kind, layers, bidir, packed, hx_given, proj)
    with torch.no_grad(), autocast():
        expected, _ = run_layer(ref, x, hx, packed)
        got, _ = run_layer(ours, x, hx, packed)
    assert [t.dtype for t in got] == [t.dtype for t in expected]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("hx_given", [False, True])
def test_autocast_cell_dtypes_match_torch(kind, hx_given):
    torch.manual_seed(0)
    ref, ours = twins(kind, input_size=I, hidden_size=H_CELL)
    x = torch.randn(B, I)
    hx = None
    if hx_given:
        hx = (torch.randn(B, H_CELL), torch.randn(B, H_CELL)) if kind == "LSTMCell" else torch.randn(B, H_CELL)
    with autocast():
        expected = ref(x, hx)
        got = ours(x, hx)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    got = list(got) if isinstance(got, tuple) else [got]
    assert [t.dtype for t in got] == [t.dtype for t in expected]


# ---------------------------------------------------------------------------------------------------
# 3. Accuracy: at most 2x torch.nn's own error against float64.
# ---------------------------------------------------------------------------------------------------
def assert_within_torch_error(ours, theirs, reference, what):
    for k, (o, t, r) in enumerate(zip(ours, theirs, reference)):
        assert o.shape == r.shape and t.shape == r.shape, (what, k)
        scale = r.abs().max().item()
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        bound = RATIO * err_torch + FLOOR * scale
        assert err_ours <= bound, (
            f"{what}[{k}]: seqfast error {err_ours:.3g} > {RATIO} x torch's {err_torch:.3g} "
            f"+ {FLOOR} x {scale:.3g}")


def cotangents(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def reference64(module, x, hx, packed, grads):
    ref64 = type(module)(**module_kwargs(module)).double()
    ref64.load_state_dict(module.state_dict())
    hx64 = None if hx is None else (tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double())
    return run_layer(ref64, x.double(), hx64, packed, grads)


def module_kwargs(m):
    if isinstance(m, torch.nn.RNNCellBase):
        kwargs = dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias)
        if isinstance(m, torch.nn.RNNCell):
            kwargs["nonlinearity"] = m.nonlinearity
        return kwargs
    kwargs = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                  bias=m.bias, bidirectional=m.bidirectional)
    if m.proj_size:
        kwargs["proj_size"] = m.proj_size
    if isinstance(m, torch.nn.RNN):
        kwargs["nonlinearity"] = m.nonlinearity
    return kwargs


@pytest.mark.parametrize("kind,layers,bidir,packed,hx_given,proj", LAYER_GRID)
def test_autocast_accuracy_within_2x_torch(kind, layers, bidir, packed, hx_given, proj):
    ref, ours, x, hx = layer_case(kind, layers, bidir, packed, hx_given, proj)
    with torch.no_grad():
        outs64, _ = reference64(ref, x, hx, packed, None)
    grads = cotangents(outs64, seed=1)
    outs64, grads64 = reference64(ref, x, hx, packed, grads)
    with autocast():
        outs_t, grads_t = run_layer(ref, x, hx, packed, grads)
        outs_s, grads_s = run_layer(ours, x, hx, packed, grads)
    for g in grads_s[-len(list(ours.parameters())):]:
        assert g.dtype == torch.float32  # float32 master weights get float32 gradients
    assert_within_torch_error(outs_s, outs_t, outs64, "outputs")
    assert_within_torch_error(grads_s, grads_t, grads64, "gradients")


def run_cell(module, x, hx, grads=None):
    x = x.detach().clone().requires_grad_(grads is not None)
    states = [h.detach().clone().requires_grad_(grads is not None) for h in (hx if isinstance(hx, tuple) else (hx,))]
    result = module(x, tuple(states) if isinstance(hx, tuple) else states[0])
    outs = list(result) if isinstance(result, tuple) else [result]
    if grads is None:
        return outs, []
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads))
    return outs, list(torch.autograd.grad(loss, [x] + states + list(module.parameters())))


def cell_case(kind, dtype, seed):
    """Cell twins in `dtype`, input, state, the upstream gradients and the float64 reference's
    outputs and gradients."""
    torch.manual_seed(0)
    ref, ours = twins(kind, input_size=I, hidden_size=H_CELL)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(B, I).to(dtype)
    hx = tuple(torch.randn(B, H_CELL).to(dtype) for _ in range(2 if kind == "LSTMCell" else 1))
    hx = hx if kind == "LSTMCell" else hx[0]
    ref64 = type(ref)(**module_kwargs(ref)).double()
    ref64.load_state_dict(ref.state_dict())
    hx64 = tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double()
    with torch.no_grad():
        outs64, _ = run_cell(ref64, x.double(), hx64)
    grads = cotangents(outs64, seed=seed)
    outs64, grads64 = run_cell(ref64, x.double(), hx64, grads)
    return ref, ours, x, hx, grads, outs64, grads64


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_cell_accuracy_within_2x_torch(kind):
    ref, ours, x, hx, grads, outs64, grads64 = cell_case(kind, torch.float32, seed=2)
    with autocast():
        outs_t, grads_t = run_cell(ref, x, hx, grads)
        outs_s, grads_s = run_cell(ours, x, hx, grads)
    assert_within_torch_error(outs_s, outs_t, outs64, "outputs")
    assert_within_torch_error(grads_s, grads_t, grads64, "gradients")


# ---------------------------------------------------------------------------------------------------
# 4. .bfloat16() modules run the fused kernel, at most 2x torch's bfloat16 error.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,packed,bidir", [("LSTM", False, False), ("LSTM", True, True),
                                               ("GRU", False, True), ("GRU", True, False),
                                               ("RNN", False, False), ("RNN", True, True)])
def test_bfloat16_module_fused_and_accurate(kind, packed, bidir, monkeypatch):
    ref, ours, x, hx = layer_case(kind, 2, bidir, packed, True, 0)
    ref, ours = ref.bfloat16(), ours.bfloat16()
    x = x.bfloat16()
    hx = tuple(h.bfloat16() for h in hx) if isinstance(hx, tuple) else hx.bfloat16()
    with torch.no_grad():
        outs64, _ = reference64(ref, x, hx, packed, None)
    grads = cotangents(outs64, seed=3)
    outs64, grads64 = reference64(ref, x, hx, packed, grads)
    outs_t, grads_t = run_layer(ref, x, hx, packed, grads)
    # The fused kernel, not torch's: fail if the module delegates.
    monkeypatch.setattr(seqfast.nn.rnn._FusedRNNBase, "_run_torch",
                        lambda *a: pytest.fail("bfloat16 module was delegated to torch"))
    outs_s, grads_s = run_layer(ours, x, hx, packed, grads)
    assert [o.dtype for o in outs_s] == [o.dtype for o in outs_t] == [BF16] * len(outs_t)
    assert all(g.dtype == BF16 for g in grads_s)
    assert_within_torch_error(outs_s, outs_t, outs64, "outputs")
    assert_within_torch_error(grads_s, grads_t, grads64, "gradients")


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_bfloat16_cell_fused_and_accurate(kind, monkeypatch):
    ref, ours, x, hx, grads, outs64, grads64 = cell_case(kind, BF16, seed=4)
    outs_t, grads_t = run_cell(ref, x, hx, grads)
    # The fused kernel, not torch's: fail if the cell delegates to torch.nn's forward.
    monkeypatch.setattr(getattr(torch.nn, kind), "forward",
                        lambda *a, **k: pytest.fail("bfloat16 cell was delegated to torch"))
    outs_s, grads_s = run_cell(ours, x, hx, grads)
    assert all(o.dtype == BF16 for o in outs_s)
    assert_within_torch_error(outs_s, outs_t, outs64, "outputs")
    assert_within_torch_error(grads_s, grads_t, grads64, "gradients")


def test_float16_cpu_is_delegated():
    """float16 on the CPU (modules cast with .half(), and float16 autocast) runs torch's own path."""
    torch.manual_seed(0)
    ref, ours = twins("GRU", input_size=I, hidden_size=H)
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=0, rtol=0)
    ref, ours = ref.half(), ours.half()
    torch.testing.assert_close(ours(x.half())[0], ref(x.half())[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 5. Training under autocast, torch.compile and torch.export.
# ---------------------------------------------------------------------------------------------------
class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = seqfast.nn.LSTM(I, H, num_layers=2, bidirectional=True)
        self.gru = seqfast.nn.GRU(2 * H, H)
        self.head = torch.nn.Linear(H, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)


def test_training_step_under_autocast():
    torch.manual_seed(0)
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(T, B, I), torch.randint(0, 3, (T * B,))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 3).float(), target)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_compile_and_export_under_autocast():
    torch.manual_seed(0)
    model = Tagger()
    x = torch.randn(T, B, I)
    with autocast():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == eager.dtype
    torch.testing.assert_close(compiled.float(), eager.float(), atol=1e-2, rtol=0)
    with autocast():
        exported = torch.export.export(model, (x,))
        out = exported.module()(x)
    torch.testing.assert_close(out.float(), eager.float(), atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 6. The GEMM paths of a CPU without the bf16 micro-kernel (oneDNN bf16 matmul) or without any bf16
#    support (at::mm in bf16): same results within bf16 rounding. The switches are read once per process.
# ---------------------------------------------------------------------------------------------------
def test_bf16_gemm_fallbacks_match():
    script = (
        "import sys, torch, seqfast\n"
        "torch.manual_seed(0)\n"
        "m = seqfast.nn.LSTM(64, 128).bfloat16()\n"
        "x = torch.randn(40, 32, 64).bfloat16().requires_grad_()\n"
        "out = m(x)[0]\n"
        "out.float().square().sum().backward()\n"
        "torch.save([out, x.grad, m.weight_hh_l0.grad, m.bias_ih_l0.grad], sys.argv[1])\n"
    )
    results = []
    for brgemm_off, onednn_off in (("0", "0"), ("1", "0"), ("1", "1")):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                            f"seqfast_bf16_gemm_{brgemm_off}{onednn_off}_{os.getpid()}.pt")
        env = dict(os.environ, SEQFAST_DISABLE_BRGEMM=brgemm_off, SEQFAST_DISABLE_ONEDNN=onednn_off)
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        results.append(torch.load(path))
        os.remove(path)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            scale = a.float().abs().max().item()
            # float32 vs bf16-rounded GEMM results (gates, products): a few bf16 ulps apart.
            torch.testing.assert_close(a.float(), b.float(), atol=0.03 * scale, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 7. A long-lived cell state: the LSTM's c must stay float32 inside the kernel.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_long_sequence_cell_state_stays_float32(packed):
    """With the forget gate near 1 (bias +4) c integrates over 64 steps and grows to ~10; rounding it to
    bfloat16 at every step would make c_n's error several times torch's (checked: the grid above, at
    T = 7, cannot see it)."""
    torch.manual_seed(0)
    ref, ours = twins("LSTM", input_size=8, hidden_size=32)
    with torch.no_grad():
        for m in (ref, ours):
            m.bias_hh_l0[32:64] += 4.0
    x = torch.randn(64, 4, 8)
    hx = (torch.randn(1, 4, 32), torch.randn(1, 4, 32))
    lengths_backup = list(LENGTHS)
    LENGTHS[:] = [64] * 4  # packed: torch's generic path keeps a float32 c float32
    try:
        with torch.no_grad():
            outs64, _ = reference64(ref, x, hx, packed, None)
            with autocast():
                outs_t, _ = run_layer(ref, x, hx, packed)
                outs_s, _ = run_layer(ours, x, hx, packed)
    finally:
        LENGTHS[:] = lengths_backup
    assert outs64[2].abs().max() > 8  # c really grew
    assert_within_torch_error(outs_s, outs_t, outs64, "outputs")
    # Stronger than the 2x rule, which cannot see this: torch's own c_n error is that of a bfloat16 c
    # (0.159 at |c| ~ 12 here), and so was seqfast's with c rounded to bfloat16 each step (0.156,
    # checked by breaking the kernel); with c in float32 it is 0.034.
    err_s = (outs_s[2].double() - outs64[2]).abs().max().item()
    err_t = (outs_t[2].double() - outs64[2]).abs().max().item()
    assert err_s <= 0.5 * err_t, (err_s, err_t)
