"""seqfast.nn.Attention and the seqfast attention ops against the plain padded reference
(seqfast/reference.py): values, weights and every gradient, for every score function, query form,
memory form and dtype; plus the properties the reference cannot show (padding is never read, no
leakage between sequences, step-by-step decoding, extreme scores, length-0 memory)."""
import math

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
import seqfast.nn
from seqfast import reference

SCORES = ("dot", "scaled_dot", "general", "concat", "location")
QUERY_FORMS = ("step", "all_steps", "packed")
MEMORY_FORMS = ("padded", "packed_sorted", "packed_unsorted")
DTYPES = (torch.float64, torch.float32)
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}

B, TQ, TK, DM, A, MAX_LEN = 4, 5, 7, 6, 3, 9
LENGTHS_UNSORTED = [3, 7, 1, 5]  # max == TK so packed and padded memories give the same weights width
LENGTHS_SORTED = [7, 5, 3, 1]
QUERY_LENGTHS = [2, 5, 1, 4]  # packed queries; unsorted, max == TQ


def query_size(score):
    return DM if score in ("dot", "scaled_dot") else 5


def make_module(score, dtype, seed=0, bias=True):
    torch.manual_seed(seed)
    return seqfast.nn.Attention(query_size(score), DM, score=score, attn_size=A, max_memory_len=MAX_LEN,
                                bias=bias and score == "concat").to(dtype)


def ref_params(mod):
    names = {"weight", "w_query", "w_memory", "v", "bias"}
    return {n: p for n, p in mod.named_parameters() if n in names}


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def run_and_grad(fn, leaves, upstream_fn):
    """fn() -> list of output tensors; upstream_fn(outputs) -> loss. Returns outputs and grads."""
    outs = fn()
    loss = upstream_fn(outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], grads


def assert_all_close(got, want, dtype, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, f"{what}[{i}]: missing gradient"
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, i=i: f"{what}[{i}]: {m}")


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("memory_form", MEMORY_FORMS)
@pytest.mark.parametrize("query_form", QUERY_FORMS)
@pytest.mark.parametrize("score", SCORES)
def test_matches_padded_reference(score, query_form, memory_form, dtype):
    mod = make_module(score, dtype)
    Dq = query_size(score)
    lengths = LENGTHS_SORTED if memory_form == "packed_sorted" else LENGTHS_UNSORTED
    lengths_t = torch.tensor(lengths)
    q_data = randn(B, Dq, dtype=dtype, seed=1) if query_form == "step" else randn(B, TQ, Dq, dtype=dtype, seed=1)
    m_data = randn(B, TK, DM, dtype=dtype, seed=2)
    params = ref_params(mod)

    def leaves():
        return q_data.clone().requires_grad_(True), m_data.clone().requires_grad_(True)

    q_leaf, m_leaf = leaves()
    if memory_form == "padded":
        memory, mem_lengths = m_leaf, lengths_t
    else:
        memory = pack_padded_sequence(m_leaf, lengths_t, batch_first=True,
                                      enforce_sorted=memory_form == "packed_sorted")
        mem_lengths = None
    query = q_leaf
    if query_form == "packed":
        query = pack_padded_sequence(q_leaf, torch.tensor(QUERY_LENGTHS), batch_first=True, enforce_sorted=False)

    context, weights = mod(query, memory, mem_lengths)
    if query_form == "packed":
        assert isinstance(context, PackedSequence) and isinstance(weights, PackedSequence)
        assert torch.equal(context.batch_sizes, query.batch_sizes)
        assert torch.equal(context.unsorted_indices, query.unsorted_indices)
        context, weights = context.data, weights.data

    q_ref, m_ref = leaves()
    c_ref, w_ref = reference.attention(q_ref, m_ref, lengths_t, score, **params)
    if query_form == "packed":
        pk = lambda t: pack_padded_sequence(t, torch.tensor(QUERY_LENGTHS), batch_first=True,  # noqa: E731
                                            enforce_sorted=False).data
        c_ref, w_ref = pk(c_ref), pk(w_ref)

    assert context.shape == c_ref.shape and weights.shape == w_ref.shape
    torch.testing.assert_close(context, c_ref, **TOL[dtype])
    torch.testing.assert_close(weights, w_ref, **TOL[dtype])

    gc = randn(*context.shape, dtype=dtype, seed=3)
    gw = randn(*weights.shape, dtype=dtype, seed=4)
    wrt = [q_leaf, m_leaf, *params.values()]
    got = torch.autograd.grad((context * gc).sum() + (weights * gw).sum(), wrt)
    want = torch.autograd.grad((c_ref * gc).sum() + (w_ref * gw).sum(), [q_ref, m_ref, *params.values()])
    names = ["query", "memory", *params]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, name=name: f"grad of {name}: {m}")


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", SCORES)
def test_gradcheck_float64(score):
    mod = make_module(score, torch.float64)
    Dq = query_size(score)
    lengths = torch.tensor([3, 0, 2])  # includes an empty memory: constant zero output, zero gradient
    q = randn(3, 2, Dq, dtype=torch.float64, seed=5).requires_grad_(True)
    m = randn(3, 3, DM, dtype=torch.float64, seed=6).requires_grad_(True)
    names = list(ref_params(mod))

    def f(q, m, *ps):
        with torch.nn.utils.stateless._reparametrize_module(mod, dict(zip(names, ps))):
            return mod(q, m, lengths)

    assert torch.autograd.gradcheck(f, (q, m, *ref_params(mod).values()))


def _op_samples(dtype=torch.float64):
    """(op overload, args) for every forward and backward op, with and without weights."""
    g = torch.Generator().manual_seed(7)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)

    cu_q = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    used = torch.tensor([4, 0, 2], dtype=torch.int32)
    Nq, Nk, D, Aa, L, W = 6, 12, 5, 3, 6, 4
    ops = torch.ops.seqfast
    samples = []
    for need_weights in (True, False):
        for seqused in (used, None):
            samples.append((ops.attention_forward.default,
                            (r(Nq, D, grad=True), r(Nk, D, grad=True), cu_q, cu_k, seqused, W, 0.5, need_weights)))
            samples.append((ops.additive_attention_forward.default,
                            (r(Nq, Aa, grad=True), r(Nk, Aa, grad=True), r(Nk, D, grad=True), r(Aa, grad=True),
                             cu_q, cu_k, seqused, W, need_weights)))
            samples.append((ops.location_attention_forward.default,
                            (r(Nq, L, grad=True), r(Nk, D, grad=True), cu_q, cu_k, seqused, W, need_weights)))
    lse = torch.ops.seqfast.attention_forward(r(Nq, D), r(Nk, D), cu_q, cu_k, used, W, 0.5, False)[1]
    for gw in (r(Nq, W), None):
        samples.append((ops.attention_backward.default,
                        (r(Nq, D), gw, r(Nq, D), r(Nk, D), cu_q, cu_k, used, lse, W, 0.5)))
        samples.append((ops.additive_attention_backward.default,
                        (r(Nq, D), gw, r(Nq, Aa), r(Nk, Aa), r(Nk, D), r(Aa), cu_q, cu_k, used, lse, W)))
        samples.append((ops.location_attention_backward.default,
                        (r(Nq, D), gw, r(Nq, L), r(Nk, D), cu_q, cu_k, used, lse, W)))
    return samples


@pytest.mark.parametrize("sample", range(len(_op_samples())))
def test_opcheck(sample):
    op, args = _op_samples()[sample]
    torch.library.opcheck(op, args)


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", SCORES)
def test_weights_zero_past_lengths_and_rows_sum_to_one(score):
    mod = make_module(score, torch.float64)
    lengths = torch.tensor([7, 0, 1, 4])
    q = randn(B, TQ, query_size(score), dtype=torch.float64, seed=8)
    m = randn(B, TK, DM, dtype=torch.float64, seed=9)
    context, weights = mod(q, m, lengths)
    for b, L in enumerate(lengths.tolist()):
        assert torch.all(weights[b, :, L:] == 0), f"sequence {b}: weights past length {L} are not 0"
        if L > 0:
            torch.testing.assert_close(weights[b].sum(-1), torch.ones(TQ, dtype=torch.float64))
            assert torch.all(weights[b, :, :L] > 0)
        else:  # length 0: zero context and zero weights (the reference gives NaN)
            assert torch.all(context[b] == 0) and torch.all(weights[b] == 0)
    c2, w2 = mod(q, m, lengths, need_weights=False)
    assert w2 is None
    assert torch.equal(c2, context)


@pytest.mark.parametrize("score", SCORES)
def test_garbage_in_padded_memory_changes_nothing(score):
    mod = make_module(score, torch.float64)
    lengths = torch.tensor([3, 7, 1, 5])
    q_data = randn(B, TQ, query_size(score), dtype=torch.float64, seed=10)
    clean = randn(B, TK, DM, dtype=torch.float64, seed=11)
    dirty = clean.clone()
    pad = torch.arange(TK).unsqueeze(0) >= lengths.unsqueeze(1)
    for b in range(B):
        for t in range(lengths[b].item(), TK):
            dirty[b, t] = (float("nan"), float("inf"), -float("inf"), 1e6, -1e6, float("nan"))[t % 6]
    assert torch.isnan(dirty).any() and pad.any()

    results = []
    for m_data in (clean, dirty):
        q = q_data.clone().requires_grad_(True)
        m = m_data.clone().requires_grad_(True)
        context, weights = mod(q, m, lengths)
        loss = (context * randn(*context.shape, dtype=torch.float64, seed=12)).sum() + \
            (weights * randn(*weights.shape, dtype=torch.float64, seed=13)).sum()
        grads = torch.autograd.grad(loss, [q, m, *mod.parameters()])
        results.append([context, weights, *grads])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output/gradient {i} changed when padded memory slots hold garbage"
    assert torch.all(results[1][3][pad] == 0), "gradient of padded memory slots must be 0"


@pytest.mark.parametrize("score", SCORES)
def test_each_sequence_equals_running_alone(score):
    mod = make_module(score, torch.float64)
    lengths = [3, 7, 1, 5]
    q = randn(B, TQ, query_size(score), dtype=torch.float64, seed=14)
    m = randn(B, TK, DM, dtype=torch.float64, seed=15)
    context, weights = mod(q, m, torch.tensor(lengths))
    for b, L in enumerate(lengths):
        c1, w1 = mod(q[b:b + 1], m[b:b + 1, :L], torch.tensor([L]))
        torch.testing.assert_close(context[b:b + 1], c1, atol=1e-13, rtol=1e-12)
        torch.testing.assert_close(weights[b:b + 1, :, :L], w1, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("memory_form", ("padded", "packed_unsorted"))
@pytest.mark.parametrize("score", SCORES)
def test_step_by_step_equals_all_steps(score, memory_form):
    mod = make_module(score, torch.float64)
    lengths = torch.tensor([3, 7, 1, 5])
    q_data = randn(B, TQ, query_size(score), dtype=torch.float64, seed=16)
    m_data = randn(B, TK, DM, dtype=torch.float64, seed=17)
    gc = randn(B, TQ, DM, dtype=torch.float64, seed=18)
    gw = randn(B, TQ, TK, dtype=torch.float64, seed=19)

    def memory_args(m):
        if memory_form == "padded":
            return m, lengths
        return pack_padded_sequence(m, lengths, batch_first=True, enforce_sorted=False), None

    runs = []
    for stepwise in (False, True):
        q = q_data.clone().requires_grad_(True)
        m = m_data.clone().requires_grad_(True)
        if stepwise:
            cache = mod.precompute(*memory_args(m))
            outs = [mod.step(q[:, t], cache) for t in range(TQ)]
            context = torch.stack([c for c, _ in outs], 1)
            weights = torch.stack([w for _, w in outs], 1)
        else:
            context, weights = mod(q, *memory_args(m))
        grads = torch.autograd.grad((context * gc).sum() + (weights * gw).sum(), [q, m, *mod.parameters()])
        runs.append([context, weights, *grads])
    for i, (a, b) in enumerate(zip(*runs)):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-11, msg=lambda msg, i=i: f"item {i}: {msg}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("score", SCORES)
def test_length_one_memory_weight_is_exactly_one(score, dtype):
    mod = make_module(score, dtype)
    q = randn(B, TQ, query_size(score), dtype=dtype, seed=20) * 10
    m = randn(B, TK, DM, dtype=dtype, seed=21)
    context, weights = mod(q, m, torch.tensor([1, 1, 4, 1]))
    for b in (0, 1, 3):
        assert torch.all(weights[b, :, 0] == 1), weights[b, :, 0]
        assert torch.all(weights[b, :, 1:] == 0)
        torch.testing.assert_close(context[b], m[b, 0].expand(TQ, DM), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("score", SCORES)
def test_huge_scores_stay_finite(score, dtype):
    mod = make_module(score, dtype)
    with torch.no_grad():  # every score scaled by 1e3
        if score in ("dot", "scaled_dot"):
            pass
        elif score == "concat":
            mod.v.mul_(1e3)
        else:
            mod.weight.mul_(1e3)
    scale = 1e3 if score in ("dot", "scaled_dot") else 1.0
    q = (randn(B, TQ, query_size(score), dtype=dtype, seed=22) * scale).requires_grad_(True)
    m = randn(B, TK, DM, dtype=dtype, seed=23).requires_grad_(True)
    lengths = torch.tensor([3, 7, 1, 5])
    context, weights = mod(q, m, lengths)
    grads = torch.autograd.grad(context.sum() + (weights * randn(*weights.shape, dtype=dtype, seed=24)).sum(),
                                [q, m, *mod.parameters()])
    for t in (context, weights, *grads):
        assert torch.isfinite(t).all()
    c_ref, w_ref = reference.attention(q.double(), m.double(), lengths, score,
                                       **{n: p.double() for n, p in ref_params(mod).items()})
    # a 1e3 scale makes the softmax nearly one-hot; ulp-level score differences move it by ~1e3 ulps
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(context.double(), c_ref, **tol)
    torch.testing.assert_close(weights.double(), w_ref, **tol)


# -------------------------------------------------------------------------------------------------
def test_location_length_exceeding_max_memory_len_raises():
    mod = seqfast.nn.Attention(5, DM, score="location", max_memory_len=4).double()
    q = randn(2, 3, 5, dtype=torch.float64, seed=25)
    m = randn(2, 6, DM, dtype=torch.float64, seed=26)
    mod(q, m, torch.tensor([4, 2]))  # fits: padded width 6 > 4 is fine, lengths are what count
    with pytest.raises(RuntimeError, match=r"memory length 5 of sequence 1 exceeds max_memory_len = 4"):
        mod(q, m, torch.tensor([4, 5]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="query_size == memory_size"):
        seqfast.nn.Attention(5, 6, score="dot")
    with pytest.raises(ValueError, match="max_memory_len"):
        seqfast.nn.Attention(5, 6, score="location")
    with pytest.raises(ValueError, match="score must be one of"):
        seqfast.nn.Attention(5, 6, score="cosine")


def test_memory_length_beyond_padding_raises():
    mod = make_module("general", torch.float64)
    with pytest.raises(RuntimeError, match=r"memory_lengths\[1\] = 9 is outside \[0, 7\]"):
        mod(randn(B, 5, dtype=torch.float64, seed=27), randn(B, TK, DM, dtype=torch.float64, seed=28),
            torch.tensor([1, 9, 2, 3]))


@pytest.mark.parametrize("autocast", (False, True), ids=("float32", "autocast_bf16"))
def test_torch_compile_fullgraph_matches_eager(autocast):
    """Under autocast the compiled graph runs the ops' AutocastCPU kernels on fake tensors while
    tracing: same dtypes as eager (bfloat16 outputs, float32 gradients), values to bfloat16 accuracy."""
    mods = [make_module(s, torch.float32) for s in SCORES]
    q = randn(B, TQ, 5, dtype=torch.float32, seed=29)
    q_dot = randn(B, TQ, DM, dtype=torch.float32, seed=30)
    m = randn(B, TK, DM, dtype=torch.float32, seed=31)
    lengths = torch.tensor([3, 7, 0, 5])

    def all_scores(q, q_dot, m, lengths):
        outs = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for mod in mods:
                query = q_dot if mod.score in ("dot", "scaled_dot") else q
                c, w = mod(query, m, lengths)
                cache = mod.precompute(m, lengths)
                c1, _ = mod.step(query[:, 0], cache, need_weights=False)
                outs += [c, w, c1]
        return outs

    def fwd_bwd(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, q_dot, m)]
        outs = fn(*leaves, lengths)
        loss = sum((o.float() * (k + 1)).sum() for k, o in enumerate(outs))
        params = [p for mod in mods for p in mod.parameters()]
        return outs, torch.autograd.grad(loss, leaves + params)

    torch._dynamo.reset()
    compiled = torch.compile(all_scores, fullgraph=True)
    eager_out, eager_grads = fwd_bwd(all_scores)
    comp_out, comp_grads = fwd_bwd(compiled)
    want = torch.bfloat16 if autocast else torch.float32
    assert [t.dtype for t in comp_out] == [t.dtype for t in eager_out] == [want] * len(eager_out)
    assert all(g.dtype == torch.float32 for g in comp_grads + eager_grads)
    tol = dict(atol=5e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    for a, b in zip(eager_out + list(eager_grads), comp_out + list(comp_grads)):
        torch.testing.assert_close(b.float(), a.float(), **tol)


def test_backward_ops_reject_malformed_saved_tensors():
    """A hand-made lse or grad_context of the wrong shape or dtype is an error, not an out-of-bounds read."""
    op, args = next((o, a) for o, a in _op_samples() if o == torch.ops.seqfast.attention_backward.default)
    args = list(args)
    good_lse, good_go = args[7], args[0]
    for bad_lse in (good_lse[:-1], good_lse.float(), good_lse.reshape(-1, 1)):
        args[7] = bad_lse
        with pytest.raises(RuntimeError, match="lse must be the"):
            op(*args)
    args[7] = good_lse
    args[0] = good_go[:-1]
    with pytest.raises(RuntimeError, match="grad_context must have shape"):
        op(*args)
