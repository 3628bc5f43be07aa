"""float32 layers large enough for the oneDNN GEMM path (RowGemm / cpu::linear switch to oneDNN above
2^26 multiply-adds per weight), against torch.nn, and against the at::mm path of the same build.

The rest of the suite uses small shapes, which stay on at::mm; these cases make sure the oneDNN path
(reordered weights, the shrinking batch of packed sequences, the input-gradient GEMM) is exercised.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import InputSpec, compare_with_torch, make_module_pair

# T*B = 800 rows; w_hh of LSTM 768x192 and w_ih 768x128 both pass the 2^26 threshold.
T, B, I, H = 25, 32, 128, 192


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("input_kind", ["padded", "packed_unsorted"])
def test_large_float32_layer_matches_torch(kind, input_kind):
    ref, sf = make_module_pair(kind, I, H, dtype=torch.float32, num_layers=2, bidirectional=True)
    spec = InputSpec(input_kind, T, B, I, batch_first=False, dtype=torch.float32)
    # Sums over 128-800 terms in float32: the absolute tolerance scales with the gradient magnitudes.
    compare_with_torch(kind, ref, sf, spec, with_hx=True, dtype=torch.float32, atol=2e-4, rtol=1e-4)


_SCRIPT = r"""
import torch, seqfast
torch.manual_seed(0)
m = seqfast.nn.LSTM(%d, %d, num_layers=2)
x = torch.randn(%d, %d, %d, requires_grad=True)
out, (h, c) = m(x)
(out.square().sum() + h.sum() + c.sum()).backward()
torch.save([out.detach(), h.detach(), c.detach(), x.grad] + [p.grad for p in m.parameters()], %r)
"""


def test_onednn_and_mm_paths_agree(tmp_path):
    results = []
    for disable in ("0", "1"):
        path = str(tmp_path / f"out{disable}.pt")
        env = dict(os.environ, SEQFAST_DISABLE_ONEDNN=disable)
        subprocess.run([sys.executable, "-c", _SCRIPT % (I, H, T, B, I, path)], env=env, check=True)
        results.append(torch.load(path))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
