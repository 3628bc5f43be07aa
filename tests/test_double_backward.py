"""Double backward (create_graph=True: gradient penalties, second-order meta-learning) through the
recurrent layers. The fused backward kernel has no derivative of its own, so under create_graph the
C++ autograd kernel (csrc/autograd.cpp) re-runs the layer through torch's differentiable
implementation and differentiates that. Checked with gradgradcheck in float64 and against torch.nn's
own second-order gradients after copying the weights."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast.nn
import seqfast.ops

CASES = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"}),
         ("LSTM", {"bias": False})]


def _pair(kind, **kw):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 4, num_layers=2, bidirectional=True, **kw).double()
    sf = getattr(seqfast.nn, kind)(3, 4, num_layers=2, bidirectional=True, **kw).double()
    sf.load_state_dict(ref.state_dict())
    return ref, sf


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(map(str, v.values())) or 'plain'}" for k, v in CASES])
def test_second_order_gradients_match_torch(kind, kw, packed):
    ref, sf = _pair(kind, **kw)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    results = []
    for module in (ref, sf):
        x = x0.clone().requires_grad_(True)
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, _ = module(inp)
        out = out.data if packed else out
        # A gradient penalty: the norm of d(loss)/dx, differentiated w.r.t. the weights and x.
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        grads = torch.autograd.grad(penalty, [x, *module.parameters()])
        results.append([gx.detach(), *grads])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("mode,reverse", [(0, False), (0, True), (1, True), (2, False), (3, True)])
def test_gradgradcheck_op(mode, reverse):
    g = torch.Generator().manual_seed(2)
    G = {0: 4, 1: 3, 2: 1, 3: 1}[mode]

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    T, B, I, H = 3, 2, 2, 3
    batch_sizes = torch.tensor([2, 2, 1])
    args = [r(5, I), batch_sizes, r(B, H), r(B, H) if mode == 0 else None, r(G * H, I), r(G * H, H),
            r(G * H), r(G * H)]

    def f(x, hx, cx, w_ih, w_hh, b_ih, b_hh):
        out, hy, cy = seqfast.ops.recurrent_layer(x, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, None, mode,
                                                  reverse, True)
        return (out, hy, cy) if mode == 0 else (out, hy)

    inputs = [a for a in args if a is not batch_sizes]
    if mode != 0:
        inputs = [inputs[0], inputs[1], None, *inputs[3:]]
    tensors = tuple(t for t in inputs if t is not None)

    def g_fn(*ts):
        it = iter(ts)
        full = [next(it) if t is not None else None for t in inputs]
        return f(*full)

    assert torch.autograd.gradgradcheck(g_fn, tensors)
