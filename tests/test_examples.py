"""Smoke tests of examples/: tiny iteration counts, but each asserts what its example promises."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("matplotlib")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stock_forecast_loss_falls_and_backends_agree(tmp_path):
    results = load_example("stock_forecast").main(["--compare", "--iterations", "40", "--out", str(tmp_path)])
    for name in ("seqfast", "torch"):
        losses = results[name]["losses"]
        assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])
    # Same initial weights, same data, same maths: 40 Adam steps apart only by float32 rounding.
    assert results["max_prediction_diff"] < 1e-4
    assert results["seqfast"]["losses"] == pytest.approx(results["torch"]["losses"], rel=1e-4)
    assert (tmp_path / "stock_forecast.png").stat().st_size > 0


@pytest.mark.parametrize("score", ["general", "concat", "location"])
def test_translate_toy_reproduces_the_lab_pairs(tmp_path, score):
    translate = load_example("translate")
    result = translate.main(["--toy", "--score", score, "--hidden-size", "64", "--embedding-size", "32",
                             "--epochs", "80", "--lr", "0.01", "--out", str(tmp_path)])
    assert result["hypotheses"] == [korean for _, korean in translate.TOY_PAIRS]
    assert result["ok"]
    assert (tmp_path / f"translate_attention_{score}.png").stat().st_size > 0


def test_translate_torch_backend_runs_on_real_data(tmp_path):
    result = load_example("translate").main(
        ["--backend", "torch", "--limit", "200", "--epochs", "1", "--hidden-size", "32", "--embedding-size",
         "16", "--out", str(tmp_path)])
    assert len(result["hypotheses"]) == 20 and 0.0 <= result["chrf"] <= 100.0


def test_translate_chrf_matches_known_values():
    chrf = load_example("translate").chrf
    assert chrf(["나는 배가 고프다."], ["나는 배가 고프다."]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == 0.0
    # hand count: hypothesis "ab", reference "abc"; n=1: 2 of 2 hyp / 3 ref match, n=2: 1 of 1 / 2;
    # precision and recall averaged over the two orders, then F with beta 2 (sacrebleu 2.x's default)
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))


def test_packed_sequence_matches_torch_rnn(tmp_path, capsys):
    assert load_example("packed_sequence").main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batch_sizes: [5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 1, 1]" in out
    assert out.rstrip().endswith("OK")
