"""The AVX-512 small-GEMM micro-kernel (csrc/cpu/small_gemm.*), which RowGemm uses for small float32
weights (W^T up to 16K elements, per-step products under 2^22 multiply-adds, >= 16 rows per call):
the same layers with it on and off (SEQFAST_DISABLE_SMALL_GEMM, read per call) against each other and
against torch.nn, with widths that exercise the 6-row tiles and their remainder, the 32-column tiles
and their masked tail, and the accumulating products of the GRU backward.

On a CPU without AVX-512 both runs take the at::mm path; the tests still pass, and say so.
"""
import pytest
import torch

from conftest import InputSpec, compare_with_torch, make_module_pair

# (I, H): 4H = 40, 76 and 132 gate columns (tails of 8, 12 and 4 columns), H = 10..33 state columns.
SHAPES = [(5, 10), (7, 19), (12, 33)]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("I,H", SHAPES)
@pytest.mark.parametrize("small_gemm", ["on", "off"])
def test_small_layers_match_torch_with_and_without_the_micro_kernel(kind, I, H, small_gemm, monkeypatch):
    if small_gemm == "off":
        monkeypatch.setenv("SEQFAST_DISABLE_SMALL_GEMM", "1")
    ref, sf = make_module_pair(kind, I, H, dtype=torch.float32, num_layers=2, bidirectional=True)
    # B = 23: 6-row tiles plus a remainder of 5; packed and unsorted, so the row count shrinks.
    spec = InputSpec("packed_unsorted", 9, 23, I, batch_first=False, dtype=torch.float32)
    compare_with_torch(kind, ref, sf, spec, with_hx=True, dtype=torch.float32, atol=5e-5, rtol=1e-5)


def test_micro_kernel_and_mm_agree_to_rounding(monkeypatch):
    torch.manual_seed(0)
    import seqfast.nn
    m = seqfast.nn.GRU(12, 33, num_layers=2)
    x = torch.randn(11, 29, 12)
    results = []
    for disable in ("0", "1"):
        monkeypatch.setenv("SEQFAST_DISABLE_SMALL_GEMM", disable)
        xg = x.clone().requires_grad_(True)
        m.zero_grad()
        out, h = m(xg)
        (out.square().sum() + h.sum()).backward()
        results.append([out.detach(), h.detach(), xg.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
