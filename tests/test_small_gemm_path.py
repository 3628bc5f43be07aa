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


# The weight gradients of small float32 layers (G*H <= 48, I and P <= 16) come from gradient_gemm
# (small_gemm.h), each thread summing its share of the tokens (a share per 512 tokens, up to the
# thread count) with the bias column sums alongside. The seed-stock shape (T=7, B=505: 3535 tokens),
# packed (token rows shrink per step), GRU (its own dgh and b_hh sums), no bias, and I = 16, H = 16
# for RNN (16 gate columns, depth 16: two depth blocks).
@pytest.mark.parametrize("kind,I,H,bias,packed", [
    ("LSTM", 5, 10, True, False), ("GRU", 5, 10, True, False), ("RNN_TANH", 5, 10, True, False),
    ("LSTM", 5, 10, False, False), ("GRU", 3, 16, True, True), ("RNN_RELU", 16, 16, True, True),
    ("LSTM", 12, 12, True, True)])
@pytest.mark.parametrize("small_gemm", ["on", "off"])
def test_weight_gradients_of_small_layers_match_torch(kind, I, H, bias, packed, small_gemm, monkeypatch):
    if small_gemm == "off":
        monkeypatch.setenv("SEQFAST_DISABLE_SMALL_GEMM", "1")
    ref, sf = make_module_pair(kind, I, H, dtype=torch.float32, bias=bias)
    spec = InputSpec("packed_unsorted" if packed else "padded", 7, 505, I, batch_first=False,
                     dtype=torch.float32)
    # Sums over ~3500 tokens in float32: torch's own blocked GEMMs differ from any other order by
    # ~1e-5 relative.
    compare_with_torch(kind, ref, sf, spec, with_hx=True, dtype=torch.float32, atol=2e-4, rtol=1e-4)
