"""The CUDA attention kernels: CPU-vs-CUDA agreement (context, weights and every gradient) for every
score, query form and memory form; opcheck on CUDA; float16/bfloat16 error against a float64 reference
bounded by the plain padded reference's own error in that dtype; padding never read; no host
synchronization inside the ops.

Every test but the first needs a GPU and is skipped without one. The first runs everywhere: a build
with the CUDA kernels must register a CUDA kernel for every attention op.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast.nn
from seqfast import _extension, reference

from test_attention import (LENGTHS_SORTED, LENGTHS_UNSORTED, MEMORY_FORMS, QUERY_FORMS,
                            QUERY_LENGTHS, SCORES, TOL, B, DM, TK, TQ, _op_samples, make_module,
                            query_size, randn, ref_params)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ATTENTION_OPS = ("attention_forward", "attention_backward", "additive_attention_forward",
                 "additive_attention_backward", "location_attention_forward",
                 "location_attention_backward")


def test_every_attention_op_has_a_cuda_kernel_in_a_cuda_build():
    if not _extension.cuda_kernels_compiled():
        pytest.skip("seqfast._C was built without CUDA kernels (test_cuda.py checks that this is on purpose)")
    missing = [op for op in ATTENTION_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfast::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


# ---------------------------------------------------------------------------------------------------
def _run(mod, score, query_form, memory_form, q_data, m_data, device):
    """Forward + backward on `device`; returns {name: float64 CPU tensor}."""
    lengths = LENGTHS_SORTED if memory_form == "packed_sorted" else LENGTHS_UNSORTED
    lengths_t = torch.tensor(lengths)
    dtype = next(mod.parameters()).dtype
    q_leaf = q_data.to(device=device, dtype=dtype).requires_grad_(True)
    m_leaf = m_data.to(device=device, dtype=dtype).requires_grad_(True)
    if memory_form == "padded":
        memory, mem_lengths = m_leaf, lengths_t
    else:
        memory = pack_padded_sequence(m_leaf, lengths_t, batch_first=True,
                                      enforce_sorted=memory_form == "packed_sorted")
        mem_lengths = None
    query = q_leaf
    if query_form == "packed":
        query = pack_padded_sequence(q_leaf, torch.tensor(QUERY_LENGTHS), batch_first=True,
                                     enforce_sorted=False)
    context, weights = mod(query, memory, mem_lengths)
    if isinstance(context, PackedSequence):
        context, weights = context.data, weights.data
    assert context.device.type == device and weights.device.type == device
    gc = randn(*context.shape, dtype=torch.float64, seed=3).to(device=device, dtype=dtype)
    gw = randn(*weights.shape, dtype=torch.float64, seed=4).to(device=device, dtype=dtype)
    params = ref_params(mod)
    grads = torch.autograd.grad((context * gc).sum() + (weights * gw).sum(),
                                [q_leaf, m_leaf, *params.values()])
    out = {"context": context, "weights": weights}
    out.update({f"grad_{n}": g for n, g in zip(["query", "memory", *params], grads)})
    return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


@requires_gpu
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("memory_form", MEMORY_FORMS)
@pytest.mark.parametrize("query_form", QUERY_FORMS)
@pytest.mark.parametrize("score", SCORES)
def test_cuda_attention_matches_cpu(score, query_form, memory_form, dtype):
    mod = make_module(score, dtype)
    Dq = query_size(score)
    shape = (B, Dq) if query_form == "step" else (B, TQ, Dq)
    q_data, m_data = randn(*shape, dtype=torch.float64, seed=1), randn(B, TK, DM, dtype=torch.float64, seed=2)
    cpu = _run(mod, score, query_form, memory_form, q_data, m_data, "cpu")
    cuda = _run(copy.deepcopy(mod).cuda(), score, query_form, memory_form, q_data, m_data, "cuda")
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


@requires_gpu
@pytest.mark.parametrize("score", SCORES)
def test_cuda_attention_long_rows_and_many_key_blocks(score):
    """Widths and lengths beyond one warp (several 32-key blocks, several column sweeps per lane),
    lengths 0 and 1 included; float64 against the CPU kernels."""
    torch.manual_seed(0)
    mod = seqfast.nn.Attention(70 if score not in ("dot", "scaled_dot") else 100, 100, score=score,
                               attn_size=45, max_memory_len=90, bias=score == "concat").double()
    lengths = torch.tensor([90, 0, 1, 33, 64, 65])
    q = randn(6, 37, mod.query_size, dtype=torch.float64, seed=5)
    m = randn(6, 90, 100, dtype=torch.float64, seed=6)
    results = []
    for device, module in (("cpu", mod), ("cuda", copy.deepcopy(mod).cuda())):
        ql, ml = q.to(device).requires_grad_(True), m.to(device).requires_grad_(True)
        context, weights = module(ql, ml, lengths)
        loss = (context * randn(*context.shape, dtype=torch.float64, seed=7).to(device)).sum() + \
            (weights * randn(*weights.shape, dtype=torch.float64, seed=8).to(device)).sum()
        grads = torch.autograd.grad(loss, [ql, ml, *module.parameters()])
        results.append([t.detach().cpu() for t in (context, weights, *grads)])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9, msg=lambda msg, i=i: f"tensor {i}: {msg}")


@requires_gpu
@pytest.mark.parametrize("score", SCORES)
def test_cuda_garbage_in_padded_memory_changes_nothing(score):
    mod = make_module(score, torch.float32).cuda()
    lengths = torch.tensor([3, 7, 1, 5])
    q_data = randn(B, TQ, query_size(score), dtype=torch.float32, seed=10).cuda()
    clean = randn(B, TK, DM, dtype=torch.float32, seed=11).cuda()
    pad = (torch.arange(TK).unsqueeze(0) >= lengths.unsqueeze(1)).cuda()
    dirty = torch.where(pad.unsqueeze(-1), torch.full_like(clean, float("nan")), clean)
    results = []
    for m_data in (clean, dirty):
        q, m = q_data.clone().requires_grad_(True), m_data.clone().requires_grad_(True)
        context, weights = mod(q, m, lengths)
        loss = context.sum() + (weights * torch.arange(TK, device="cuda")).sum()
        results.append([context, weights, *torch.autograd.grad(loss, [q, m, *mod.parameters()])])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output/gradient {i} changed when padded memory slots hold NaN"
    assert torch.all(results[1][3][pad] == 0), "gradient of padded memory slots must be 0"


# ---------------------------------------------------------------------------------------------------
def _cuda_sample(sample):
    op, args = _op_samples()[sample]
    moved = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dtype == torch.float64:
            a = a.detach().cuda().requires_grad_(a.requires_grad)
        moved.append(a)  # the int32 index tensors stay on the CPU (the varlen contract)
    return op, tuple(moved)


@requires_gpu
@pytest.mark.parametrize("sample", range(len(_op_samples())))
def test_cuda_attention_opcheck(sample):
    op, args = _cuda_sample(sample)
    torch.library.opcheck(op, args)


@requires_gpu
@pytest.mark.parametrize("score", SCORES)
def test_cuda_attention_never_synchronizes(score):
    mod = make_module(score, torch.float32).cuda()
    lengths = torch.tensor(LENGTHS_UNSORTED)
    q = randn(B, TQ, query_size(score), dtype=torch.float32, seed=1).cuda().requires_grad_(True)
    m = randn(B, TK, DM, dtype=torch.float32, seed=2).cuda().requires_grad_(True)
    cache = mod.precompute(m, lengths)  # the layout (CPU index tensors) is built here, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        context, weights = mod.step(q[:, 0], cache)
        (context.sum() + weights.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert q.grad is not None and m.grad is not None


# ---------------------------------------------------------------------------------------------------
@requires_gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
@pytest.mark.parametrize("score", SCORES)
def test_cuda_attention_low_precision_error_within_2x_reference(score, dtype):
    """float16/bfloat16: seqfast's error against a float64 reference is at most 2x the error of the
    plain padded implementation (seqfast/reference.py, torch ops) run in the same dtype on the GPU."""
    torch.manual_seed(0)
    Bn, Tq, Tk, D = 8, 12, 40, 64
    mod64 = seqfast.nn.Attention(D, D, score=score, attn_size=32, max_memory_len=Tk,
                                 bias=score == "concat").double()
    lengths = torch.randint(1, Tk + 1, (Bn,))
    lengths[0] = Tk
    q = randn(Bn, Tq, D, dtype=torch.float64, seed=21)
    m = randn(Bn, Tk, D, dtype=torch.float64, seed=22)
    gc = randn(Bn, Tq, D, dtype=torch.float64, seed=23)

    def run(fn, module, device, dt):
        ql = q.to(device, dt).requires_grad_(True)
        ml = m.to(device, dt).requires_grad_(True)
        params = {n: p.detach().to(device, dt).requires_grad_(True) for n, p in ref_params(module).items()}
        context = fn(ql, ml, params)
        grads = torch.autograd.grad((context * gc.to(device, dt)).sum(), [ql, ml, *params.values()])
        return [t.detach().to("cpu", torch.float64) for t in (context, *grads)]

    def seqfast_fn(ql, ml, params):
        module = copy.deepcopy(mod64).to(ql.device, ql.dtype)
        with torch.nn.utils.stateless._reparametrize_module(module, params):
            return module(ql, ml, lengths, need_weights=False)[0]

    def reference_fn(ql, ml, params):
        return reference.attention(ql, ml, lengths.to(ql.device), score, **params)[0]

    truth = run(reference_fn, mod64, "cpu", torch.float64)
    ours = run(seqfast_fn, mod64, "cuda", dtype)
    theirs = run(reference_fn, mod64, "cuda", dtype)
    names = ["context", "grad_query", "grad_memory", *ref_params(mod64)]
    for name, t, a, b in zip(names, truth, ours, theirs):
        err_ours = (a - t).abs().max().item()
        err_ref = (b - t).abs().max().item()
        floor = 4 * torch.finfo(dtype).eps * max(t.abs().max().item(), 1.0)
        assert err_ours <= max(2 * err_ref, floor), (
            f"{name}: seqfast {dtype} error {err_ours:.3g} > 2x the reference's {err_ref:.3g}")
