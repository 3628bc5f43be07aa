"""AOTInductor: a model with seqfast layers, exported with torch.export, compiled ahead of time with
torch._inductor.aoti_compile_and_package, loaded back with aoti_load_package, equals eager.

The seqfast ops are custom C++ ops: the compiled package calls them through AOTInductor's proxy
executor, so the process that runs the package must have them registered (`import seqfast` first).
One small model, compiled once (a C++ compile: ~30 s on 2 cores).
"""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import seqfast


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = seqfast.nn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = seqfast.nn.GRUCell(16, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        out, (h, _) = self.encoder(x)
        return self.head(self.cell(out[:, -1], h[-1]))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(3, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path_factory.mktemp("aoti") / "model.pt2"))
    return model, x, program, path


def test_aoti_package_equals_eager(compiled, tmp_path):
    model, x, program, path = compiled
    # The compiled graph still calls the fused op (the proxy executor runs seqfast's kernel).
    assert "torch.ops.seqfast.recurrent_layer_forward.default" in program.graph_module.code
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-6)
        other = torch.randn_like(x)
        torch.testing.assert_close(loaded(other), model(other), rtol=0, atol=1e-6)

    # A fresh process that only imports seqfast (for the op registrations) runs the package.
    torch.save({"x": other, "want": model(other).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, seqfast
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = torch._inductor.aoti_load_package({path!r})(io["x"])
        torch.testing.assert_close(got, io["want"], rtol=0, atol=1e-6)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
