"""The banded time loop (csrc/cpu/recurrent_layer_kernel.cpp: row_bands) against torch.nn.

Small layers run one independent time loop per thread over a band of batch rows. The equivalence grid
uses batches of at most 4 rows, which stay in one band on a 2-thread machine, so here the band count
is forced through SEQFAST_ROW_BANDS (read per call) in a subprocess, with uneven bands, packed
sequences of different lengths (bands hold equal token counts) and both directions.
"""
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import torch, seqfast
from torch.nn.utils.rnn import pack_padded_sequence
torch.manual_seed(0)
kinds = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})]
for name, kw in kinds:
    ref = getattr(torch.nn, name)(5, 7, num_layers=2, bidirectional=True, **kw).double()
    sf = getattr(seqfast.nn, name)(5, 7, num_layers=2, bidirectional=True, **kw).double()
    sf.load_state_dict(ref.state_dict())
    lengths = torch.tensor([3, 9, 1, 9, 4, 7, 2, 8, 5, 6, 1, 9, 2])
    for packed in (False, True):
        x = torch.randn(9, 13, 5, dtype=torch.float64, requires_grad=True)
        results = []
        for m in (ref, sf):
            m.zero_grad(); x.grad = None
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            out, h = m(inp)
            out = out.data if packed else out
            hs = h if isinstance(h, tuple) else (h,)
            (out.sin().sum() + sum((t * t).sum() for t in hs)).backward()
            results.append([out.detach(), *[t.detach() for t in hs], x.grad.clone()]
                           + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
print("bands ok")
"""


@pytest.mark.parametrize("bands", ["2", "3", "13"])
def test_banded_time_loop_matches_torch(bands):
    env = dict(os.environ, SEQFAST_ROW_BANDS=bands)
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bands ok" in result.stdout
