// Unit tests of csrc/include/seqfast/gates.h and recurrent.h: the activations against libm, and every
// backward function against central finite differences of its forward, in float and double.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "seqfast/gates.h"
#include "seqfast/recurrent.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, double got, double want, double tol) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.17g want %.17g (tol %.3g)\n", what, got, want, tol);
  }
}

void expect_near(const char* what, double got, double want, double atol, double rtol = 0) {
  const double tol = atol + rtol * std::fabs(want);
  check(std::fabs(got - want) <= tol, what, got, want, tol);
}

void test_float_activations() {
  // Relative error of the vectorizable exp over the range sigmoid/tanh use, and absolute error of
  // tanh/sigmoid over a wide range, against double-precision libm.
  double worst_exp = 0, worst_tanh = 0, worst_sigmoid = 0, worst_tanh_rel_small = 0;
  for (double x = -87.0; x <= 88.0; x += 0.00137) {
    const float xf = float(x);
    const double want = std::exp(double(xf));
    worst_exp = std::fmax(worst_exp, std::fabs(seqfast::math::exp(xf) - want) / want);
  }
  for (double x = -30.0; x <= 30.0; x += 0.000731) {
    worst_tanh = std::fmax(worst_tanh, std::fabs(seqfast::math::tanh(float(x)) - std::tanh(float(x))));
    worst_sigmoid = std::fmax(worst_sigmoid, std::fabs(seqfast::math::sigmoid(float(x)) -
                                                       1.0 / (1.0 + std::exp(-double(float(x))))));
  }
  for (double x = 1e-6; x < 0.5; x *= 1.01) {
    const float xf = float(x);
    worst_tanh_rel_small = std::fmax(
        worst_tanh_rel_small, std::fabs(seqfast::math::tanh(xf) - std::tanh(double(xf))) / std::tanh(double(xf)));
  }
  expect_near("float exp max relative error", worst_exp, 0.0, 3e-7);
  expect_near("float tanh max abs error", worst_tanh, 0.0, 3e-7);
  expect_near("float sigmoid max abs error", worst_sigmoid, 0.0, 3e-7);
  expect_near("float tanh max relative error near 0", worst_tanh_rel_small, 0.0, 1e-6);
  // Saturation without inf/NaN, and odd symmetry.
  for (float x : {-1e30f, -1e4f, -100.0f, 100.0f, 1e4f, 1e30f}) {
    const float t = seqfast::math::tanh(x), s = seqfast::math::sigmoid(x);
    check(std::isfinite(t) && std::fabs(std::fabs(t) - 1.0f) < 1e-7f, "tanh saturates", t, x > 0 ? 1 : -1, 1e-7);
    check(std::isfinite(s) && std::fabs(s - (x > 0 ? 1.0f : 0.0f)) < 1e-7f, "sigmoid saturates", s, x > 0, 1e-7);
  }
  for (float x : {0.01f, 0.3f, 2.0f, 7.5f}) {
    expect_near("tanh is odd", seqfast::math::tanh(-x), -seqfast::math::tanh(x), 2e-7);
  }
  check(std::isnan(seqfast::rnn_pointwise_forward<seqfast::Activation::Relu>(NAN)), "relu(NaN) is NaN", 0, 0, 0);
}

// Finite-difference check of a backward function: `loss(inputs)` is a scalar function of the forward;
// `grads` the analytic gradient of that loss the backward function produced.
void fd_check(const char* what, const std::function<double(const std::vector<double>&)>& loss,
              std::vector<double> x, const std::vector<double>& grads) {
  for (size_t k = 0; k < x.size(); ++k) {
    const double eps = 1e-6, keep = x[k];
    x[k] = keep + eps;
    const double up = loss(x);
    x[k] = keep - eps;
    const double down = loss(x);
    x[k] = keep;
    expect_near(what, grads[k], (up - down) / (2 * eps), 1e-7, 1e-6);
  }
}

void test_lstm() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(-2, 2);
  for (int trial = 0; trial < 50; ++trial) {
    // x = (pre_i, pre_f, pre_g, pre_o, c_prev); loss = a*h + b*c with random a, b.
    std::vector<double> x = {u(rng), u(rng), u(rng), u(rng), u(rng)};
    const double a = u(rng), b = u(rng);
    auto loss = [&](const std::vector<double>& v) {
      double i, f, g, o, c, tc, h;
      seqfast::lstm_pointwise_forward(v[0], v[1], v[2], v[3], v[4], i, f, g, o, c, tc, h);
      return a * h + b * c;
    };
    double i, f, g, o, c, tc, h;
    seqfast::lstm_pointwise_forward(x[0], x[1], x[2], x[3], x[4], i, f, g, o, c, tc, h);
    expect_near("lstm c", c, 1 / (1 + std::exp(-x[1])) * x[4] + 1 / (1 + std::exp(-x[0])) * std::tanh(x[2]), 1e-15);
    expect_near("lstm h", h, 1 / (1 + std::exp(-x[3])) * std::tanh(c), 1e-15);
    std::vector<double> grads(5);
    seqfast::lstm_pointwise_backward(i, f, g, o, tc, x[4], a, b, grads[0], grads[1], grads[2], grads[3], grads[4]);
    fd_check("lstm backward", loss, x, grads);
  }
}

void test_gru() {
  std::mt19937 rng(2);
  std::uniform_real_distribution<double> u(-2, 2);
  for (int trial = 0; trial < 50; ++trial) {
    // x = (gi_r, gi_z, gi_n, gh_r, gh_z, gh_n, h_prev); loss = a*h.
    std::vector<double> x(7);
    for (auto& v : x) v = u(rng);
    const double a = u(rng);
    auto loss = [&](const std::vector<double>& v) {
      double r, z, n, h;
      seqfast::gru_pointwise_forward(v[0], v[1], v[2], v[3], v[4], v[5], v[6], r, z, n, h);
      return a * h;
    };
    double r, z, n, h;
    seqfast::gru_pointwise_forward(x[0], x[1], x[2], x[3], x[4], x[5], x[6], r, z, n, h);
    const double r_ref = 1 / (1 + std::exp(-(x[0] + x[3]))), z_ref = 1 / (1 + std::exp(-(x[1] + x[4])));
    const double n_ref = std::tanh(x[2] + r_ref * x[5]);
    expect_near("gru h", h, (1 - z_ref) * n_ref + z_ref * x[6], 1e-15);
    double dgi_r, dgi_z, dgi_n, dgh_n, direct;
    seqfast::gru_pointwise_backward(r, z, n, x[5], x[6], a, dgi_r, dgi_z, dgi_n, dgh_n, direct);
    // r and z pre-activations are shared by the input and hidden parts: same gradient for both.
    fd_check("gru backward", loss, x, {dgi_r, dgi_z, dgi_n, dgi_r, dgi_z, dgh_n, direct});
  }
}

void test_rnn() {
  for (double pre : {-1.7, -0.2, 0.3, 2.2}) {
    const double h_tanh = seqfast::rnn_pointwise_forward<seqfast::Activation::Tanh>(pre);
    const double h_relu = seqfast::rnn_pointwise_forward<seqfast::Activation::Relu>(pre);
    expect_near("rnn tanh", h_tanh, std::tanh(pre), 1e-15);
    expect_near("rnn relu", h_relu, pre > 0 ? pre : 0, 0);
    const double eps = 1e-6;
    expect_near("rnn tanh backward", seqfast::rnn_pointwise_backward<seqfast::Activation::Tanh>(h_tanh, 0.7),
                0.7 * (std::tanh(pre + eps) - std::tanh(pre - eps)) / (2 * eps), 1e-8);
    expect_near("rnn relu backward", seqfast::rnn_pointwise_backward<seqfast::Activation::Relu>(h_relu, 0.7),
                pre > 0 ? 0.7 : 0.0, 0);
  }
}

void test_workspace_layout() {
  const seqfast::WorkspaceLayout lstm(seqfast::CellKind::LSTM, 8, 3, true);
  expect_near("lstm workspace columns", lstm.columns, 4 * 8 + 8 + 8 + 3 + 8, 0);
  expect_near("lstm h_unproj after h_prev", lstm.h_unproj, lstm.h_prev + 3, 0);
  const seqfast::WorkspaceLayout gru(seqfast::CellKind::GRU, 8, 8, false);
  expect_near("gru workspace columns", gru.columns, 5 * 8, 0);
  const seqfast::WorkspaceLayout rnn(seqfast::CellKind::RNN_RELU, 8, 8, false);
  expect_near("rnn workspace columns", rnn.columns, 8, 0);
  expect_near("gate counts", seqfast::gate_count(seqfast::CellKind::LSTM) * 100 +
              seqfast::gate_count(seqfast::CellKind::GRU) * 10 + seqfast::gate_count(seqfast::CellKind::RNN_TANH), 431, 0);
}

}  // namespace

int main() {
  test_float_activations();
  test_lstm();
  test_gru();
  test_rnn();
  test_workspace_layout();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all gate checks passed\n");
  return 0;
}
