"""The unit-split forward time loop (csrc/cpu/recurrent_layer_kernel.cpp, layer_forward_unit_split):
large layers run their whole forward as one parallel region, each thread owning a slice of the hidden
units, with the input projection computed per chunk of steps.

It is chosen by size, so most equivalence tests (small layers) never reach it. Here it is forced with
SEQFAST_UNIT_SPLIT=1 (read per call: two slices whatever the size, one unit granularity, so uneven
slices and H = 7 occur) over the grid of directions, packed batches with sequences starting late in
the reverse direction, given/absent initial states, training (the saved workspace feeds the shared
backward) and every cell kind; float64 tightly, float32 at torch's tolerance and bfloat16 under
autocast within 2x torch's own error (test_bf16.py's rule). A size where it is chosen on its own is
checked too, and SEQFAST_UNIT_SPLIT=0 must give the default loop's results.
"""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
import seqfast.nn

import test_bf16

KINDS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"})]
T, B, I, H = 6, 5, 4, 7
LENGTHS = [6, 6, 4, 2, 1]


def twins(kind, kwargs, dtype, **extra):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(I, H, **kwargs, **extra).to(dtype)
    ours = getattr(seqfast.nn, kind)(I, H, **kwargs, **extra).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(module, x, hx, packed, grads):
    x = x.detach().clone().requires_grad_(grads)
    states = [] if hx is None else [h.detach().clone().requires_grad_(grads) for h in hx]
    inp = pack_padded_sequence(x, LENGTHS) if packed else x
    arg = None if hx is None else (tuple(states) if len(states) == 2 else states[0])
    out, h_n = module(inp, arg)
    outs = [out.data if packed else out] + (list(h_n) if isinstance(h_n, tuple) else [h_n])
    if not grads:
        return outs
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    got = torch.autograd.grad(outs, [x] + states + list(module.parameters()), cot)
    return outs + list(got)


@pytest.mark.parametrize("kind,kwargs", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidir,packed,hx_given,grads",
                         list(itertools.product([False, True], [False, True], [False, True], [False, True])))
def test_forced_split_matches_torch(kind, kwargs, dtype, bidir, packed, hx_given, grads, monkeypatch):
    monkeypatch.setenv("SEQFAST_UNIT_SPLIT", "1")
    ref, ours = twins(kind, kwargs, dtype, num_layers=2, bidirectional=bidir)
    torch.manual_seed(1)
    x = torch.randn(T, B, I, dtype=dtype)
    D = 2 if bidir else 1
    hx = None
    if hx_given:
        hx = [torch.randn(2 * D, B, H, dtype=dtype)]
        if kind == "LSTM":
            hx.append(torch.randn(2 * D, B, H, dtype=dtype))
    expected = run(ref, x, hx, packed, grads)
    got = run(ours, x, hx, packed, grads)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else {}
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"tensor {k}: {m}")


@pytest.mark.parametrize("kind,layers,bidir,packed,hx_given,proj",
                         [c for c in test_bf16.LAYER_GRID if c[5] == 0 and c[1] == 1])
def test_forced_split_bf16_within_2x_torch(kind, layers, bidir, packed, hx_given, proj, monkeypatch):
    monkeypatch.setenv("SEQFAST_UNIT_SPLIT", "1")
    test_bf16.test_autocast_accuracy_within_2x_torch(kind, layers, bidir, packed, hx_given, proj)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_chosen_by_size_matches_default_loop(kind, dtype, monkeypatch):
    """B = 16, H = 256: a per-step GEMM of >= 2^22 multiply-adds for LSTM/GRU (>= 2^20 for RNN with
    forcing), where the split is the default; its result must equal torch's and the default loop's."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(64, 256)
    ours = getattr(seqfast.nn, kind)(64, 256)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 16, 64)
    if dtype == torch.bfloat16:
        ref, ours, x = ref.bfloat16(), ours.bfloat16(), x.bfloat16()
    monkeypatch.setenv("SEQFAST_UNIT_SPLIT", "1" if kind == "RNN" else "auto")
    with torch.no_grad():
        split_out, split_h = ours(x)
        monkeypatch.setenv("SEQFAST_UNIT_SPLIT", "0")
        default_out, default_h = ours(x)
        ref_out, _ = ref.float()(x.float())
    if dtype == torch.float32:
        torch.testing.assert_close(split_out, ref_out)
        torch.testing.assert_close(split_out, default_out)
    else:
        # Both loops compute the gates in float32 from float32 GEMM results; only the GEMM's blocking
        # (and so its float32 summation order) differs: outputs agree to bf16 rounding.
        torch.testing.assert_close(split_out.float(), default_out.float(), atol=2e-2, rtol=2e-2)
        assert (split_out.float() - ref_out).abs().max() < 0.05
    hs = split_h if kind != "LSTM" else split_h[0]
    hd = default_h if kind != "LSTM" else default_h[0]
    torch.testing.assert_close(hs.float(), hd.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind,kwargs", KINDS[:3])
def test_forced_split_ragged_panels_match_torch(kind, kwargs, monkeypatch):
    """I = 37, H = 45: the packed weight panels (float32) end in partial 16-deep blocks and partly
    filled 32-column panels, in the input and recurrent weights and in W_hh^T of the backward."""
    monkeypatch.setenv("SEQFAST_UNIT_SPLIT", "1")
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(37, 45, **kwargs)
    ours = getattr(seqfast.nn, kind)(37, 45, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 12, 37)
    ref_out = run(ref, x, None, packed=False, grads=True)
    our_out = run(ours, x, None, packed=False, grads=True)
    for k, (a, b) in enumerate(zip(our_out, ref_out)):
        torch.testing.assert_close(a, b, msg=lambda m: f"tensor {k}: {m}")
