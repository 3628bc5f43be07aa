"""ONNX export of seqfast modules with both exporters, run in onnxruntime and compared with eager.

Each seqfast recurrent op call must become a standard ONNX LSTM/GRU/RNN node (so onnxruntime runs its
own kernels), and seqfast.nn.Attention standard ops with its padding mask.
"""
import io
import logging
import subprocess
import sys
import warnings

import pytest
import torch

import seqfast

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    # The exporters print progress, deprecation and "batch size fixed" warnings; none is a failure.
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


class WithState(torch.nn.Module):
    """Passes the initial state as separate graph inputs (a tuple hx would be flattened anyway)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, h, c=None):
        return self.inner(x, (h, c) if c is not None else h)


def _flat(out):
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _export(model, args, dynamo):
    if dynamo:  # a plain export: seqfast registers its translations with the exporter's registry
        return torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def _run_and_compare(model, args, dynamo, expect_ops):
    model.eval()
    proto = _export(model, args, dynamo)
    op_types = [n.op_type for n in proto.graph.node]
    for op, count in expect_ops.items():
        assert op_types.count(op) == count, op_types
    assert not any(n.domain.startswith("seqfast") for n in proto.graph.node)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert len(names) == len(tensors)
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, tensors)})
    with torch.no_grad():
        want = _flat(model(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=ATOL)


# (module, kwargs, with_state): each runs under both exporters.
RECURRENT = [
    ("LSTM", {"num_layers": 2, "bidirectional": True}, False),
    ("LSTM", {"batch_first": True, "bias": False}, True),
    ("GRU", {"num_layers": 2, "batch_first": True}, True),
    ("GRU", {"bidirectional": True, "bias": False}, False),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True}, True),
    ("RNN", {"num_layers": 2, "batch_first": True}, False),
]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind,kwargs,with_state", RECURRENT, ids=lambda v: str(v))
def test_export_recurrent_layer(kind, kwargs, with_state, dynamo):
    torch.manual_seed(0)
    m = getattr(seqfast.nn, kind)(5, 7, **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    x = torch.randn(3, 4, 5) if kwargs.get("batch_first") else torch.randn(4, 3, 5)
    args = (x,)
    if with_state:
        m = WithState(m)
        args = (x, torch.randn(L * D, 3, 7)) + ((torch.randn(L * D, 3, 7),) if kind == "LSTM" else ())
    _run_and_compare(m, args, dynamo, {kind: L * D})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_export_cell(kind, dynamo):
    torch.manual_seed(0)
    cell = getattr(seqfast.nn, kind)(5, 7, **({"nonlinearity": "relu"} if kind == "RNNCell" else {}))
    x = torch.randn(3, 5)
    args = (x, torch.randn(3, 7)) + ((torch.randn(3, 7),) if kind == "LSTMCell" else ())
    _run_and_compare(WithState(cell), args, dynamo, {kind[:-4]: 1})


def test_export_cell_without_state():
    torch.manual_seed(0)
    _run_and_compare(seqfast.nn.LSTMCell(5, 7), (torch.randn(3, 5),), False, {"LSTM": 1})


def test_dynamo_export_with_the_explicit_table():
    # For code that builds its own table: seqfast's, passed explicitly or through seqfast.onnx.export.
    torch.manual_seed(0)
    m, x = seqfast.nn.GRU(5, 7).eval(), torch.randn(4, 3, 5)
    for program in (torch.onnx.export(m, (x,), dynamo=True, verbose=False,
                                      custom_translation_table=seqfast.onnx.custom_translation_table),
                    seqfast.onnx.export(m, (x,), verbose=False)):
        assert [n.op_type for n in program.model_proto.graph.node].count("GRU") == 1


def test_dynamo_registration_when_onnxscript_was_imported_first():
    # The other import order: onnxscript's torch_lib already loaded when seqfast is imported.
    script = ("import torch, logging; logging.disable(logging.WARNING)\n"
              "import onnxscript.function_libs.torch_lib.ops\n"
              "import seqfast\n"
              "p = torch.onnx.export(seqfast.nn.RNN(5, 7).eval(), (torch.randn(4, 3, 5),), dynamo=True,"
              " verbose=False)\n"
              "print([n.op_type for n in p.model_proto.graph.node].count('RNN'))\n")
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.split()[-1] == "1", run.stderr[-2000:]


def test_gate_rows_match_onnx_layout():
    # The ONNX gate orders, spelt out: LSTM i,o,f,c from torch i,f,g,o; GRU z,r,h from torch r,z,n.
    assert seqfast.onnx.gate_rows(0, 1) == [0, 3, 1, 2]
    assert seqfast.onnx.gate_rows(1, 2) == [2, 3, 0, 1, 4, 5]
    assert seqfast.onnx.gate_rows(3, 2) == [0, 1]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_export_projection_is_a_clear_error(dynamo):
    m = seqfast.nn.LSTM(5, 7, proj_size=3).eval()
    with pytest.raises(Exception, match="proj_size > 0 is not supported") as info:
        _export(m, (torch.randn(4, 3, 5),), dynamo)
    assert "proj_size" in str(info.value)


def test_export_packed_input_is_a_clear_error():
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = seqfast.nn.LSTM(5, 7)

        def forward(self, x, lengths):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            return torch.nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0])[0]

    with pytest.raises(Exception, match="PackedSequence input is not supported"):
        _export(Packed().eval(), (torch.randn(4, 3, 5), torch.tensor([4, 2, 3])), False)


ATTENTION = [("dot", {}), ("general", {}), ("concat", {"bias": True}), ("location", {"max_memory_len": 6})]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("score,kwargs", ATTENTION, ids=lambda v: str(v))
def test_export_attention(score, kwargs, dynamo):
    torch.manual_seed(0)
    m = seqfast.nn.Attention(8, 8, score=score, **kwargs)
    query, memory = torch.randn(3, 2, 8), torch.randn(3, 6, 8)
    memory[1, 2:] = float("nan")  # padding must not leak into the exported result
    lengths = torch.tensor([6, 2, 4])
    _run_and_compare(m, (query, memory, lengths), dynamo, {"Softmax": 1})


def test_export_attention_lengths_are_an_input():
    # The mask comes from the lengths at run time, not from the lengths seen while exporting.
    torch.manual_seed(0)
    m = seqfast.nn.Attention(8, 8, score="general").eval()
    query, memory = torch.randn(3, 8), torch.randn(3, 6, 8)
    proto = _export(m, (query, memory, torch.tensor([6, 2, 4])), False)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths = torch.tensor([1, 0, 5])  # a length-0 memory: zero context and weights, as in eager
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()],
                                  [query.numpy(), memory.numpy(), lengths.numpy()])))
    with torch.no_grad():
        want = m(query, memory, lengths)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=ATOL)


def test_benchmark_onnxruntime_column(monkeypatch):
    # issue 11: the inference rows get an onnxruntime contestant (torch.nn exported, one session);
    # without onnxruntime the column says so and the rest still runs.
    from seqfast import benchmarking, ort_benchmark

    def run():
        return benchmarking.run_rnn_benchmarks(cells=["gru"], configs=["cell-step"], modes=["inference"],
                                               repeats=2, warmup=1, progress=None, onnxruntime=True)

    monkeypatch.setattr(ort_benchmark, "PAUSE_S", 0.01)
    (row,) = run()
    assert row["error"] is None and row["onnxruntime"] == ort.__version__
    assert row["onnxruntime_s"] > 0 and row["onnxruntime_max_abs_diff"] < ATOL
    assert "| GRUCell |" in ort_benchmark.markdown_table([row])
    # onnxruntime runs float32 only: a bf16 (autocast) row has no line in its table.
    assert "| GRUCell |" not in ort_benchmark.markdown_table([dict(row, precision="autocast")])

    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import now fails
    (row,) = run()
    assert row["error"] is None and row["onnxruntime"] == "not installed" and row["seqfast_s"] > 0
    assert "not installed" in ort_benchmark.markdown_table([row])
