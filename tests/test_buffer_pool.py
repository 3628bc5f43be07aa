"""The CPU kernels' large per-call buffers are kept when freed and reused by the next call
(csrc/cpu/buffers.cpp). A reused block must never be one a live tensor still uses, and the results
must stay those of torch.nn."""
import pytest
import torch

import seqfast
from conftest import tolerance

# LSTM at T=20, B=64, H=256: the (T*B, H) float32 output is 1.25 MiB, above the pool's 1 MiB floor.
T, B, I, H = 20, 64, 32, 256


def _pair(kind):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(I, H)
    mine = getattr(seqfast.nn, kind)(I, H)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_live_outputs_never_share_a_block(kind):
    ref, mine = _pair(kind)
    xs = [torch.randn(T, B, I) for _ in range(4)]
    with torch.no_grad():
        mine(xs[0])  # its output's block goes back to the pool
        outs = [mine(x)[0] for x in xs]
        starts = {o.data_ptr() for o in outs}
        assert len(starts) == len(outs)
        for x, o in zip(xs, outs):  # each still holds its own call's result
            torch.testing.assert_close(o, ref(x)[0], **tolerance(torch.float32))


def test_freed_output_block_is_reused():
    _, mine = _pair("LSTM")
    x = torch.randn(T, B, I)
    with torch.no_grad():
        first = mine(x)[0]
        expected = first.clone()
        start = first.data_ptr()
        del first
        again = mine(x)[0]
    assert again.data_ptr() == start
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_training_with_reused_blocks_matches_torch():
    ref, mine = _pair("LSTM")
    tol = tolerance(torch.float32)
    for step in range(3):  # later steps run on the blocks the earlier ones freed
        ref.zero_grad()
        mine.zero_grad()
        x = torch.randn(T, B, I, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        out_ref, _ = ref(x)
        out_mine, _ = mine(x2)
        g = torch.randn_like(out_ref)
        out_ref.backward(g)
        out_mine.backward(g)
        torch.testing.assert_close(out_mine, out_ref, **tol)
        torch.testing.assert_close(x2.grad, x.grad, **tol)
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=name)
