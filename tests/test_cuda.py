"""The CUDA kernels: CPU-vs-CUDA agreement (outputs, final states and every gradient), gradcheck and
opcheck on CUDA, float16/bfloat16 error against a float64 reference bounded by torch.nn's own error,
and no host synchronization inside the ops.

Every test but the first needs a GPU and is skipped without one. The first runs everywhere: a CUDA build
of torch must have produced a seqfast build with the CUDA kernels (a silently CPU-only build fails).
"""
import copy
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
import seqfast.nn
import seqfast.ops
from seqfast import _extension

from conftest import make_module_pair, tolerance
from test_ops import BWD, FWD, MODES, make_args

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CELL_KINDS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


def test_cuda_kernels_compiled_in_a_cuda_build():
    if torch.version.cuda is None:
        assert not _extension.cuda_kernels_compiled(), "a CPU-only torch cannot have CUDA kernels"
        return
    if os.environ.get("SEQFAST_CUDA") == "0":
        pytest.skip("SEQFAST_CUDA=0: this build is CPU-only on purpose")
    assert _extension.cuda_kernels_compiled(), (
        f"torch {torch.__version__} is a CUDA build but seqfast._C has no CUDA kernels: it was built "
        "without nvcc (or with SEQFAST_CUDA=0). Rebuild with SEQFAST_CUDA=1 to see why.")


# ---------------------------------------------------------------------------------------------------
# Running a module on a device: everything returned as float64 CPU tensors, by name
# ---------------------------------------------------------------------------------------------------
def _upstream(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def run_module(kind, module, x_data, lengths, batch_first, h0, c0, device, grad_dtype):
    """Forward + backward of `module` on `device`. x_data, h0, c0: CPU tensors (converted to the
    module's dtype); lengths: None (padded) or a list (packed, unsorted allowed). The upstream gradients
    are drawn in float64 and rounded to `grad_dtype`, so runs in different dtypes can share them.
    Returns {name: float64 CPU tensor} for output, h_n, c_n and the gradients of input, h0, c0 and every
    parameter."""
    dtype = next(module.parameters()).dtype
    x = x_data.to(device=device, dtype=dtype).requires_grad_(True)
    h = h0.to(device=device, dtype=dtype).requires_grad_(True)
    c = c0.to(device=device, dtype=dtype).requires_grad_(True) if c0 is not None else None
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    out, hidden = module(inp, (h, c) if kind == "LSTM" else h)
    output = out.data if lengths is not None else out
    h_n, c_n = hidden if kind == "LSTM" else (hidden, None)
    outs = {"output": output, "h_n": h_n}
    if c_n is not None:
        outs["c_n"] = c_n
    ups = [_upstream(t.shape, 7 + i, grad_dtype).to(device=device, dtype=t.dtype)
           for i, t in enumerate(outs.values())]
    leaves = {"input": x, "h0": h, **({"c0": c} if c is not None else {}), **dict(module.named_parameters())}
    grads = torch.autograd.grad(list(outs.values()), list(leaves.values()), ups)
    result = {k: v.detach().double().cpu() for k, v in outs.items()}
    result.update({"grad " + k: g.double().cpu() for k, g in zip(leaves, grads)})
    return result


def _inputs(T, B, I, batch_first, packed, dtype):
    g = torch.Generator().manual_seed(1234)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    lengths = None
    if packed:  # unsorted, with the full length and a length-1 sequence
        lengths = [max(1, (T * (k + 1)) // B) for k in range(B)][::-1]
        lengths[0], lengths[-1] = lengths[-1], lengths[0]
        lengths[B // 2] = T
    return x, lengths


def _states(kind, module, B, dtype):
    g = torch.Generator().manual_seed(99)
    D = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    h0 = torch.randn(module.num_layers * D, B, P, generator=g, dtype=torch.float64).to(dtype)
    c0 = None
    if kind == "LSTM":
        c0 = torch.randn(module.num_layers * D, B, module.hidden_size, generator=g,
                         dtype=torch.float64).to(dtype)
    return h0, c0


def _assert_all_close(got, ref, what, **tol):
    assert set(got) == set(ref), f"{what}: {set(got) ^ set(ref)}"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **tol, msg=lambda m, n=name: f"{what} {n}: {m}")


# ---------------------------------------------------------------------------------------------------
# CPU vs CUDA, float64 and float32
# ---------------------------------------------------------------------------------------------------
CONFIGS = {
    "2layer-bidir": dict(num_layers=2, bidirectional=True),
    "batch_first-nobias": dict(batch_first=True, bias=False),
    "proj": dict(proj_size=3, bidirectional=True),  # LSTM only
}
AGREEMENT_CASES = [(kind, cfg) for kind in CELL_KINDS for cfg in CONFIGS if cfg != "proj" or kind == "LSTM"]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind,config", AGREEMENT_CASES, ids=[f"{k}-{c}" for k, c in AGREEMENT_CASES])
def test_cuda_matches_cpu(kind, config, layout, dtype):
    kw = CONFIGS[config]
    T, B, I, H = 9, 5, 5, 7
    _, sf = make_module_pair(kind, I, H, dtype=dtype, **kw)
    sf_cuda = copy.deepcopy(sf).cuda()
    batch_first = kw.get("batch_first", False)
    x, lengths = _inputs(T, B, I, batch_first, layout == "packed", dtype)
    h0, c0 = _states(kind, sf, B, dtype)
    ref = run_module(kind, sf, x, lengths, batch_first, h0, c0, "cpu", dtype)
    got = run_module(kind, sf_cuda, x, lengths, batch_first, h0, c0, "cuda", dtype)
    _assert_all_close(got, ref, f"{kind} {config} {layout}", **tolerance(dtype))


@requires_gpu
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_matches_cpu_awkward_sizes(kind):
    """Many thread blocks per step, H not a multiple of anything, long packed sequences."""
    dtype = torch.float64
    T, B, I, H = 97, 37, 19, 259
    _, sf = make_module_pair(kind, I, H, dtype=dtype)
    x, lengths = _inputs(T, B, I, False, True, dtype)
    h0, c0 = _states(kind, sf, B, dtype)
    ref = run_module(kind, sf, x, lengths, False, h0, c0, "cpu", dtype)
    got = run_module(kind, copy.deepcopy(sf).cuda(), x, lengths, False, h0, c0, "cuda", dtype)
    _assert_all_close(got, ref, kind, **tolerance(dtype))


@requires_gpu
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cuda_cells_match_cpu(cls):
    torch.manual_seed(0)
    cell = getattr(seqfast.nn, cls)(6, 8).double()
    cell_cuda = copy.deepcopy(cell).cuda()
    x = torch.randn(4, 6, dtype=torch.float64)
    h = torch.randn(4, 8, dtype=torch.float64)
    hx = (h, torch.randn(4, 8, dtype=torch.float64)) if cls == "LSTMCell" else h
    ref = cell(x, hx)
    got = cell_cuda(x.cuda(), tuple(t.cuda() for t in hx) if cls == "LSTMCell" else hx.cuda())
    ref, got = (ref, got) if cls == "LSTMCell" else ((ref,), (got,))
    for r, g in zip(ref, got):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), r, **tolerance(torch.float64))


# ---------------------------------------------------------------------------------------------------
# The ops on CUDA: gradcheck, opcheck, no host synchronization
# ---------------------------------------------------------------------------------------------------
def _to_cuda(args):
    """Every tensor argument to the GPU except batch_sizes (index 1), which stays on the CPU."""
    return [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and i != 1 else a
            for i, a in enumerate(args)]


OP_CASES = [(name, layout, reverse) for name in list(MODES) + ["lstm_proj"]
            for layout in ("padded", "packed") for reverse in (False, True)]


def _op_case_id(c):
    return f"{c[0]}-{c[1]}-{'rev' if c[2] else 'fwd'}"


@requires_gpu
@pytest.mark.parametrize("case", OP_CASES, ids=_op_case_id)
def test_cuda_gradcheck(case):
    name, layout, reverse = case
    mode = MODES[name.replace("_proj", "")]
    args = _to_cuda(make_args(mode, layout, True, 2 if name == "lstm_proj" else 0, I=2, H=3,
                              requires_grad=True, reverse=reverse, seed=1))
    diff_idx = [i for i in (0, 2, 3, 4, 5, 6, 7, 8) if args[i] is not None]

    def fn(*ts):
        a = list(args)
        for i, t in zip(diff_idx, ts):
            a[i] = t
        out, hy, cy = seqfast.ops.recurrent_layer(*a)
        return (out, hy, cy) if mode == 0 else (out, hy)

    assert torch.autograd.gradcheck(fn, [args[i] for i in diff_idx], eps=1e-6, atol=1e-6, rtol=1e-4)


@requires_gpu
@pytest.mark.parametrize("case", OP_CASES[::2], ids=_op_case_id)
def test_cuda_opcheck(case):
    name, layout, reverse = case
    mode = MODES[name.replace("_proj", "")]
    args = _to_cuda(make_args(mode, layout, True, 2 if name == "lstm_proj" else 0, requires_grad=True,
                              reverse=reverse))
    torch.library.opcheck(FWD, args)
    out, hy, cy, ws = FWD(*args)
    go, ghy = torch.randn_like(out), torch.randn_like(hy)
    gcy = torch.randn_like(cy) if mode == 0 else None
    bargs = [go, ghy, gcy, *args[:9], out, ws, mode, reverse]
    bargs = [a.detach() if isinstance(a, torch.Tensor) else a for a in bargs]
    torch.library.opcheck(BWD, bargs)


@requires_gpu
@pytest.mark.parametrize("name", list(MODES) + ["lstm_proj"])
def test_cuda_ops_never_synchronize(name):
    """batch_sizes is read on the host before the loop; nothing inside forward or backward syncs."""
    mode = MODES[name.replace("_proj", "")]
    args = _to_cuda(make_args(mode, "packed", True, 2 if name == "lstm_proj" else 0, training=True))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, hy, cy, ws = FWD(*args)
        gcy = torch.ones_like(cy) if mode == 0 else None
        BWD(torch.ones_like(out), torch.ones_like(hy), gcy, *args[:9], out, ws, mode, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# float16 / bfloat16: error vs a float64 reference at most 2x torch.nn's own error in that dtype
# ---------------------------------------------------------------------------------------------------
LOW_CASES = [(kind, cfg) for kind in CELL_KINDS for cfg in ("2layer-bidir", "proj")
             if cfg != "proj" or kind == "LSTM"]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind,config", LOW_CASES, ids=[f"{k}-{c}" for k, c in LOW_CASES])
def test_cuda_low_precision_error_within_2x_torch(kind, config, layout, dtype):
    kw = CONFIGS[config]
    T, B, I, H = 20, 6, 32, 64
    ref_low, sf_low = make_module_pair(kind, I, H, dtype=dtype, **kw)
    # The float64 reference uses the parameters and inputs as rounded to the low dtype.
    ref64 = copy.deepcopy(ref_low).double()
    ref_low, sf_low = ref_low.cuda(), sf_low.cuda()
    assert seqfast.nn.rnn._has_fused_kernel(torch.empty(0, device="cuda", dtype=dtype)), \
        "the seqfast module would fall back to torch in this dtype: the test would compare torch to itself"
    x, lengths = _inputs(T, B, I, False, layout == "packed", dtype)
    h0, c0 = _states(kind, sf_low, B, dtype)
    truth = run_module(kind, ref64, x, lengths, False, h0, c0, "cpu", dtype)
    torch_res = run_module(kind, ref_low, x, lengths, False, h0, c0, "cuda", dtype)
    sf_res = run_module(kind, sf_low, x, lengths, False, h0, c0, "cuda", dtype)
    for name, exact in truth.items():
        torch_err = (torch_res[name] - exact).abs().max().item()
        sf_err = (sf_res[name] - exact).abs().max().item()
        # + 1e-6: a floor far below fp16/bf16 resolution, for a quantity torch happens to get exact
        assert sf_err <= 2 * torch_err + 1e-6, (
            f"{kind} {config} {layout} {dtype} {name}: seqfast error {sf_err:.3g} > 2 x torch.nn error "
            f"{torch_err:.3g}")


# ---------------------------------------------------------------------------------------------------
# The persistent small-batch forward (csrc/cuda/recurrent_layer_persistent.cu) vs the GEMM path
# ---------------------------------------------------------------------------------------------------
PERSISTENT_KERNEL = "persistent_forward_kernel"


def _persistent_eligible(kind, H, B, dtype):
    """What plan_persistent_forward (recurrent_layer_persistent.cuh) should decide on this GPU: the same
    rule and shared-memory sizes, so that a test notices when the kernel silently stops being used. The
    occupancy check is left out: with __launch_bounds__(256, 1) one block always fits in registers.
    For layers without projection."""
    if not 1 <= B <= 8 or H > 1024:
        return False
    props = torch.cuda.get_device_properties()
    G = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    t_bytes = torch.empty(0, dtype=dtype).element_size()
    a_bytes = 8 if dtype == torch.float64 else 4
    units = -(-H // props.multi_processor_count)
    if units * B > 256:
        return False
    vec = 16 // t_bytes
    Hp = -(-H // vec) * vec
    groups = -(-(G * units) // 4)
    k_splits = 1
    while k_splits * 2 * groups <= 8:
        k_splits *= 2
    part = -(-(k_splits * B * G * units * a_bytes) // 16) * 16
    smem = part + (1 << (B - 1).bit_length()) * Hp * t_bytes + G * units * Hp * t_bytes
    return smem <= getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def _profiled(fn, *args):
    """fn(*args), and whether the persistent kernel ran during it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn(*args)
        torch.cuda.synchronize()
    return result, any(PERSISTENT_KERNEL in e.name for e in prof.events())


def _forward_only(kind, module, x_data, lengths, h0, c0):
    """A no_grad forward (training=False: the kernels save nothing) -> {name: float64 CPU tensor}."""
    dtype = next(module.parameters()).dtype
    x = x_data.to(device="cuda", dtype=dtype)
    inp = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False) if lengths is not None else x
    h = h0.to(device="cuda", dtype=dtype)
    with torch.no_grad():
        out, hidden = module(inp, (h, c0.to(device="cuda", dtype=dtype)) if kind == "LSTM" else h)
    h_n, c_n = hidden if kind == "LSTM" else (hidden, None)
    result = {"output": out.data if lengths is not None else out, "h_n": h_n}
    if c_n is not None:
        result["c_n"] = c_n
    return {k: v.double().cpu() for k, v in result.items()}


# Every (B, H) pair for each cell and dtype; padded and packed alternate over the pairs, so that each B
# and each H meets both layouts.
PERSISTENT_SIZES = [(B, H, "packed" if (i + j) % 2 else "padded")
                    for i, B in enumerate((1, 4, 8)) for j, H in enumerate((32, 200, 1024))]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("B,H,layout", PERSISTENT_SIZES, ids=[f"B{b}-H{h}-{l}" for b, h, l in PERSISTENT_SIZES])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_persistent_matches_gemm_path_and_float64(kind, B, H, layout, dtype, monkeypatch):
    """Two layers, both directions (so forward and reverse time order), training: outputs, final states
    and every gradient, the backward (unchanged) reading the workspace the persistent forward saved.
    float32: persistent == GEMM path == float64 CPU at the float32 tolerance; bfloat16: the persistent
    path's error against float64 at most 2x torch.nn's own (as test_cuda_low_precision_...)."""
    T, I = 7, 24
    ref, sf = make_module_pair(kind, I, H, dtype=dtype, num_layers=2, bidirectional=True)
    ref64 = copy.deepcopy(ref).double()
    sf = sf.cuda()
    x, lengths = _inputs(T, B, I, False, layout == "packed", dtype)
    h0, c0 = _states(kind, sf, B, dtype)
    args = (x, lengths, False, h0, c0, "cuda", dtype)

    monkeypatch.setenv("SEQFAST_PERSISTENT_RNN", "1")
    persistent, ran = _profiled(run_module, kind, sf, *args)
    assert ran == _persistent_eligible(kind, H, B, dtype), f"persistent kernel ran: {ran}"
    monkeypatch.setenv("SEQFAST_PERSISTENT_RNN", "0")
    gemm, ran = _profiled(run_module, kind, sf, *args)
    assert not ran, "SEQFAST_PERSISTENT_RNN=0 but the persistent kernel ran"
    truth = run_module(kind, ref64, x, lengths, False, h0, c0, "cpu", dtype)

    what = f"{kind} B={B} H={H} {layout}"
    if dtype == torch.float32:
        _assert_all_close(persistent, gemm, f"{what}: persistent vs GEMM path", **tolerance(dtype))
        _assert_all_close(persistent, truth, f"{what}: persistent vs float64", **tolerance(dtype))
    else:
        torch_res = run_module(kind, ref.cuda(), *args)
        assert set(persistent) == set(truth)
        for name, exact in truth.items():
            torch_err = (torch_res[name] - exact).abs().max().item()
            err = (persistent[name] - exact).abs().max().item()
            assert err <= 2 * torch_err + 1e-6, (
                f"{what} {name}: persistent error {err:.3g} > 2 x torch.nn error {torch_err:.3g}")


@requires_gpu
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_persistent_inference_matches_gemm_path(kind, monkeypatch):
    """training=False (the instantiation that saves nothing), with SEQFAST_PERSISTENT_RNN=1 spelled out."""
    T, B, I, H = 11, 5, 16, 200
    _, sf = make_module_pair(kind, I, H, dtype=torch.float32, num_layers=2, bidirectional=True)
    sf = sf.cuda()
    x, lengths = _inputs(T, B, I, False, True, torch.float32)
    h0, c0 = _states(kind, sf, B, torch.float32)
    monkeypatch.setenv("SEQFAST_PERSISTENT_RNN", "1")
    persistent, ran = _profiled(_forward_only, kind, sf, x, lengths, h0, c0)
    assert ran == _persistent_eligible(kind, H, B, torch.float32)
    monkeypatch.setenv("SEQFAST_PERSISTENT_RNN", "0")
    gemm, ran = _profiled(_forward_only, kind, sf, x, lengths, h0, c0)
    assert not ran
    _assert_all_close(persistent, gemm, f"{kind} inference", **tolerance(torch.float32))


INELIGIBLE_CASES = [("LSTM", 9, 0), ("GRU", 9, 0), ("RNN_RELU", 9, 0), ("LSTM", 4, 3)]


@requires_gpu
@pytest.mark.parametrize("kind,B,proj_size", INELIGIBLE_CASES,
                         ids=[f"{k}-B{b}-proj{p}" for k, b, p in INELIGIBLE_CASES])
def test_persistent_ineligible_layers_take_the_gemm_path(kind, B, proj_size, monkeypatch):
    """B > 8 or a projection: the GEMM path runs, silently, and still matches the CPU in float64."""
    monkeypatch.setenv("SEQFAST_PERSISTENT_RNN", "1")
    dtype = torch.float64
    T, I, H = 6, 8, 32
    _, sf = make_module_pair(kind, I, H, dtype=dtype, num_layers=2, bidirectional=True, proj_size=proj_size)
    x, lengths = _inputs(T, B, I, False, True, dtype)
    h0, c0 = _states(kind, sf, B, dtype)
    ref = run_module(kind, sf, x, lengths, False, h0, c0, "cpu", dtype)
    got, ran = _profiled(run_module, kind, copy.deepcopy(sf).cuda(), x, lengths, False, h0, c0, "cuda", dtype)
    assert not ran, "the persistent kernel ran on a layer it is not eligible for"
    _assert_all_close(got, ref, f"{kind} B={B} proj_size={proj_size}", **tolerance(dtype))


@requires_gpu
def test_persistent_kernel_is_opt_in(monkeypatch):
    """Unset (or 0), an eligible layer takes the GEMM path: the persistent kernel has not yet run on a
    GPU anywhere, so it must be asked for (SEQFAST_PERSISTENT_RNN=1)."""
    monkeypatch.delenv("SEQFAST_PERSISTENT_RNN", raising=False)
    _, sf = make_module_pair("LSTM", 16, 32, dtype=torch.float32)
    x, lengths = _inputs(5, 2, 16, False, False, torch.float32)
    h0, c0 = _states("LSTM", sf, 2, torch.float32)
    _, ran = _profiled(_forward_only, "LSTM", sf.cuda(), x, lengths, h0, c0)
    assert not ran, "the persistent kernel ran without SEQFAST_PERSISTENT_RNN=1"
    assert _persistent_eligible("LSTM", 32, 2, torch.float32), "this layer should be eligible"


@requires_gpu
def test_persistent_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("SEQFAST_PERSISTENT_RNN", "yes")
    args = _to_cuda(make_args(0, "padded", True, 0, training=False))
    with pytest.raises(RuntimeError, match="SEQFAST_PERSISTENT_RNN must be 0"):
        FWD(*args)
