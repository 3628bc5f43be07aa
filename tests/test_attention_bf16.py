"""seqfast.nn.Attention in low precision on the CPU: under torch.autocast("cpu", dtype=bfloat16 or
float16) with float32 modules and inputs, and as a `.bfloat16()` module with bfloat16 inputs.

What is checked, always against the padded reference (seqfast/reference.py) run the same way:
- the output dtypes (context, weights) are the reference's, read live, so the tests follow torch;
- accuracy: against a float64 reference computed from the same weights and inputs, seqfast's max-abs
  error on the context, the weights and every gradient (query, memory, each parameter) is at most
  2x the reference's own error in the same precision, plus a small absolute floor (FLOOR, below), over
  every score x query form x memory form;
- gradients arrive in each leaf's dtype (float32 master weights under autocast);
- the ops' autocast policy (float32 inputs cast to the autocast dtype, lse kept in float32) and the
  kernels' immunity to the caller's autocast state (backward inside the autocast region);
- opcheck of every op in bfloat16.
torch.compile(fullgraph=True) under autocast is tests/test_attention.py::test_torch_compile_fullgraph_matches_eager.
"""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
import seqfast.nn
from seqfast import reference
from test_attention import _op_samples  # tests/ is on sys.path (pytest's rootdir-relative import)

SCORES = ("dot", "scaled_dot", "general", "concat", "location")
FORWARD_OPS = (torch.ops.seqfast.attention_forward.default, torch.ops.seqfast.additive_attention_forward.default,
               torch.ops.seqfast.location_attention_forward.default)
QUERY_FORMS = ("step", "all_steps", "packed")
MEMORY_FORMS = ("padded", "packed")
# autocast_bf16 / autocast_fp16: float32 module and inputs under torch.autocast("cpu", dtype);
# bf16_module: module.bfloat16() and bfloat16 inputs, no autocast.
PRECISIONS = ("autocast_bf16", "autocast_fp16", "bf16_module")

# Sizes large enough that a max-abs error is a maximum over many elements (so the 2x rule compares
# the two implementations' rounding, not the luck of a few elements), small enough to run quickly.
B, TQ, TK, DM, DQ, ATT, MAX_LEN = 32, 10, 40, 64, 48, 64, 48
# unsorted; max == TK so packed and padded memories give the same weights width
LENGTHS = [17, 40, 1, 33, 9, 26, 40, 12, 5, 38, 21, 30, 2, 40, 14, 27] * 2
QUERY_LENGTHS = [3, 10, 1, 7, 10, 5, 8, 2, 10, 6, 4, 9, 1, 10, 3, 7] * 2
# Absolute floor added to the 2x bound: a few float32 ulps at the outputs' scale (|values| <= ~4), far
# below one bfloat16 ulp (2^-8 relative). It only matters where the reference's own error is ~0 (an
# exactly representable result, such as a gradient that is zero by construction).
FLOOR = 1e-5


def query_size(score):
    return DM if score in ("dot", "scaled_dot") else DQ


def make_module(score, seed=0):
    torch.manual_seed(seed)
    return seqfast.nn.Attention(query_size(score), DM, score=score, attn_size=ATT, max_memory_len=MAX_LEN,
                                bias=score == "concat")


def params_of(mod):
    return dict(mod.named_parameters())


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lowp_dtype(precision):
    return torch.float16 if precision == "autocast_fp16" else torch.bfloat16


def context_manager(precision):
    if precision.startswith("autocast"):
        return torch.autocast("cpu", dtype=lowp_dtype(precision))
    return torch.autocast("cpu", enabled=False)


def run(impl, mod, q_data, m_data, score, query_form, memory_form, gc, gw, precision):
    """Forward (and backward of sum(context * gc) + sum(weights * gw)) of `impl` ("seqfast" or
    "reference") on fresh leaves. Returns [context, weights] as the padded-query layout of the
    reference (packed queries: the packed rows), and the gradients of query, memory, each parameter."""
    q = q_data.clone().requires_grad_(True)
    m = m_data.clone().requires_grad_(True)
    lengths = torch.tensor(LENGTHS)
    params = params_of(mod)
    with context_manager(precision):
        if impl == "seqfast":
            query = q
            if query_form == "packed":
                query = pack_padded_sequence(q, torch.tensor(QUERY_LENGTHS), batch_first=True,
                                             enforce_sorted=False)
            if memory_form == "packed":
                memory = pack_padded_sequence(m, lengths, batch_first=True, enforce_sorted=False)
                context, weights = mod(query, memory)
            else:
                context, weights = mod(query, m, lengths)
            if query_form == "packed":
                assert isinstance(context, PackedSequence) and isinstance(weights, PackedSequence)
                context, weights = context.data, weights.data
        else:
            context, weights = reference.attention(q, m, lengths, score, **params)
            if query_form == "packed":
                def pk(t):
                    return pack_padded_sequence(t, torch.tensor(QUERY_LENGTHS), batch_first=True,
                                                enforce_sorted=False).data
                context, weights = pk(context), pk(weights)
        loss = (context.double() * gc).sum() + (weights.double() * gw).sum()
    grads = torch.autograd.grad(loss, [q, m, *params.values()])
    return [context.detach(), weights.detach()], list(grads)


def inputs(score, query_form, precision):
    mod = make_module(score)
    q = randn(B, query_size(score), seed=1) if query_form == "step" else randn(B, TQ, query_size(score), seed=1)
    m = randn(B, TK, DM, seed=2)
    if precision == "bf16_module":
        mod, q, m = mod.bfloat16(), q.bfloat16(), m.bfloat16()
    return mod, q, m


def upstream(score, query_form):
    """Fixed float64 upstream gradients for the context and the weights (in the reference's layout)."""
    rows = B if query_form == "step" else (sum(QUERY_LENGTHS) if query_form == "packed" else B * TQ)
    shape_c = (B, DM) if query_form == "step" else ((rows, DM) if query_form == "packed" else (B, TQ, DM))
    shape_w = shape_c[:-1] + (TK,)
    return randn(*shape_c, seed=3).double(), randn(*shape_w, seed=4).double()


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("memory_form", MEMORY_FORMS)
@pytest.mark.parametrize("query_form", QUERY_FORMS)
@pytest.mark.parametrize("score", SCORES)
def test_output_dtypes_match_reference(score, query_form, memory_form, precision):
    mod, q, m = inputs(score, query_form, precision)
    gc, gw = upstream(score, query_form)
    outs, grads = run("seqfast", mod, q, m, score, query_form, memory_form, gc, gw, precision)
    ref_outs, ref_grads = run("reference", mod, q, m, score, query_form, "padded", gc, gw, precision)
    assert [t.dtype for t in outs] == [t.dtype for t in ref_outs], "context/weights dtypes differ from the reference"
    assert outs[0].dtype == lowp_dtype(precision)  # the low-precision path ran, not a silent float32
    # gradients arrive in each leaf's dtype: float32 master weights under autocast, bf16 for a bf16 module
    leaves = [q, m, *params_of(mod).values()]
    assert [g.dtype for g in grads] == [t.dtype for t in leaves] == [g.dtype for g in ref_grads]
    with context_manager(precision):
        c, w = mod(q, m, torch.tensor(LENGTHS), need_weights=False)
    assert w is None and c.dtype == outs[0].dtype


# -------------------------------------------------------------------------------------------------
def max_errors(got, truth):
    return [(g.double() - t).abs().max().item() for g, t in zip(got, truth)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("memory_form", MEMORY_FORMS)
@pytest.mark.parametrize("query_form", QUERY_FORMS)
@pytest.mark.parametrize("score", SCORES)
def test_error_at_most_twice_the_reference(score, query_form, memory_form, precision):
    """FlashAttention's rule: |seqfast_lowp - exact| <= 2 |reference_lowp - exact| (+ FLOOR), where
    exact is the float64 reference on the same (float32 or bfloat16) weights and inputs."""
    mod, q, m = inputs(score, query_form, precision)
    gc, gw = upstream(score, query_form)
    exact_mod = make_module(score)
    exact_mod.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    exact_mod.double()
    truth_outs, truth_grads = run("reference", exact_mod, q.double(), m.double(), score, query_form, "padded",
                                  gc, gw, "fp64")
    ref_outs, ref_grads = run("reference", mod, q, m, score, query_form, "padded", gc, gw, precision)
    sf_outs, sf_grads = run("seqfast", mod, q, m, score, query_form, memory_form, gc, gw, precision)
    names = ["context", "weights", "grad query", "grad memory", *(f"grad {n}" for n in params_of(mod))]
    truth = truth_outs + truth_grads
    ref_err = max_errors(ref_outs + ref_grads, truth)
    sf_err = max_errors(sf_outs + sf_grads, truth)
    bad = [f"{n}: seqfast {s:.3g} > 2 x reference {r:.3g} + {FLOOR}"
           for n, s, r in zip(names, sf_err, ref_err) if not s <= 2 * r + FLOOR]
    assert not bad, "; ".join(bad)


# -------------------------------------------------------------------------------------------------
def _forward_samples(dtype=torch.float32):
    """(forward op, args) of test_attention's op samples in `dtype`, as plain (no grad) inputs."""
    return [(op, [a.detach() if isinstance(a, torch.Tensor) else a for a in args])
            for op, args in _op_samples(dtype) if op in FORWARD_OPS]


def _is_float(a):
    return isinstance(a, torch.Tensor) and a.is_floating_point()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("sample", range(len(_forward_samples())))
def test_forward_ops_follow_autocasts_lower_precision_policy(sample, dtype):
    """Under autocast, float32 inputs are cast to the autocast dtype and the op runs on them: the same
    bits as calling it on the cast inputs outside autocast; lse stays float32; float64 is left alone."""
    op, args = _forward_samples()[sample]
    with torch.autocast("cpu", dtype=dtype):
        context, lse, weights = op(*args)
    cast = [a.to(dtype) if _is_float(a) else a for a in args]
    want = op(*cast)
    assert (context.dtype, lse.dtype, weights.dtype) == (dtype, torch.float32, dtype)
    for got, w in zip((context, lse, weights), want):
        assert torch.equal(got, w)
    args64 = [a.double() if _is_float(a) else a for a in args]
    with torch.autocast("cpu", dtype=dtype):
        out64 = op(*args64)
    assert all(t.dtype == torch.float64 for t in out64)
    for got, w in zip(out64, op(*args64)):
        assert torch.equal(got, w)


@pytest.mark.parametrize("sample", range(len(_op_samples())))
def test_opcheck_bfloat16(sample):
    """Schema, fake (lse in float32 for bfloat16 memory), autograd registration and AOT dispatch of
    every op in bfloat16."""
    op, args = _op_samples(torch.bfloat16)[sample]
    torch.library.opcheck(op, args)


def test_backward_ops_in_bfloat16_match_float32_math():
    """The bfloat16 backward kernels compute in float32: on bfloat16 inputs they agree with the float32
    kernels run on the same (widened) values to float32 rounding, before the final bfloat16 rounding."""
    for op, args in _forward_samples(torch.bfloat16):
        leaves = [a.requires_grad_(True) if _is_float(a) else a for a in args]
        context, _, weights = op(*leaves[:-1], True)
        gc, gw = torch.randn_like(context), torch.randn_like(weights)
        grads = torch.autograd.grad((context * gc).sum() + (weights * gw).sum(), [a for a in leaves if _is_float(a)])
        leaves32 = [a.detach().float().requires_grad_(True) if _is_float(a) else a for a in args]
        c32, _, w32 = op(*leaves32[:-1], True)
        grads32 = torch.autograd.grad((c32 * gc.float()).sum() + (w32 * gw.float()).sum(),
                                      [a for a in leaves32 if _is_float(a)])
        torch.testing.assert_close(context, c32.bfloat16(), atol=0, rtol=0)
        torch.testing.assert_close(weights, w32.bfloat16(), atol=0, rtol=0)
        for g, g32 in zip(grads, grads32):
            assert g.dtype == torch.bfloat16
            # one bfloat16 rounding of the float32 result (ties may round either way after the
            # float32 sums are reassociated): within one bfloat16 ulp
            torch.testing.assert_close(g.float(), g32, atol=1e-6, rtol=2 ** -7)


@pytest.mark.parametrize("score", SCORES)
def test_backward_inside_autocast_equals_backward_outside(score):
    """The kernels do not depend on the caller's autocast state: running backward inside the autocast
    region (a common training loop) gives the same gradients as after leaving it."""
    mod, q, m = inputs(score, "all_steps", "autocast_bf16")
    lengths = torch.tensor(LENGTHS)
    results = []
    for inside in (True, False):
        ql, ml = q.clone().requires_grad_(True), m.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            context, weights = mod(ql, ml, lengths)
            loss = context.float().square().sum() + weights.float().sum(-1).square().sum()
            if inside:
                grads = torch.autograd.grad(loss, [ql, ml, *mod.parameters()])
        if not inside:
            grads = torch.autograd.grad(loss, [ql, ml, *mod.parameters()])
        results.append(grads)
    for a, b in zip(*results):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_mixed_dtypes_outside_autocast_raise():
    mod = make_module("general").bfloat16()
    with pytest.raises(RuntimeError, match="must be BFloat16 like the other inputs, got Float"):
        torch.ops.seqfast.attention_forward(randn(4, DM, seed=5), randn(4, DM, seed=6).bfloat16(),
                                            torch.tensor([0, 4], dtype=torch.int32),
                                            torch.tensor([0, 4], dtype=torch.int32), None, 4, 1.0, True)
    with pytest.raises(RuntimeError):  # a float32 query into a bfloat16 module, as torch.nn would
        mod(randn(B, TQ, DQ, seed=7), randn(B, TK, DM, seed=8).bfloat16(), torch.tensor(LENGTHS))


@pytest.mark.parametrize("score", SCORES)
def test_bf16_weights_zero_past_lengths_and_empty_memory(score):
    mod, q, m = inputs(score, "all_steps", "bf16_module")
    lengths = torch.tensor(LENGTHS)
    lengths[3] = 0
    context, weights = mod(q, m, lengths)
    for b, L in enumerate(lengths.tolist()):
        assert torch.all(weights[b, :, L:] == 0)
        if L == 0:
            assert torch.all(context[b] == 0)
        else:
            torch.testing.assert_close(weights[b].float().sum(-1), torch.ones(TQ), atol=2e-2, rtol=0)
