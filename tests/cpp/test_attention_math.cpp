// Unit tests of csrc/include/seqfast/attention.h, the host/device attention math the CPU and CUDA
// kernels share: the row -> sequence search the CUDA kernels use (against a linear scan, empty
// sequences included), the streaming softmax fed per key and per block of keys (the CPU and CUDA
// kernels feed it differently) against a direct log-sum-exp, and the additive score's gradient
// against central finite differences.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "seqfast/attention.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.17g want %.17g\n", what, got, want);
  }
}

void expect_near(const char* what, double got, double want, double tol) {
  expect(std::fabs(got - want) <= tol, what, got, want);
}

void test_sequence_of_row() {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 2000; ++trial) {
    const int B = 1 + static_cast<int>(rng() % 9);
    std::vector<int32_t> cu(B + 1, 0);
    for (int b = 0; b < B; ++b) cu[b + 1] = cu[b] + static_cast<int32_t>(rng() % 4);  // 0..3 rows, empties too
    for (int32_t row = 0; row < cu[B]; ++row) {
      int64_t want = -1;
      for (int b = 0; b < B; ++b) {
        if (cu[b] <= row && row < cu[b + 1]) want = b;
      }
      const int64_t got = seqfast::sequence_of_row(cu.data(), B, row);
      expect(got == want, "sequence_of_row", double(got), double(want));
    }
  }
}

void test_key_range() {
  const int32_t cu[] = {0, 4, 4, 9};
  const int32_t used[] = {3, 0, 6};
  int64_t start = -1, length = -1;
  bool ok = seqfast::key_range(cu, nullptr, 2, start, length);
  expect(ok && start == 4 && length == 5, "key_range", double(length), 5);
  ok = seqfast::key_range(cu, used, 0, start, length);
  expect(ok && start == 0 && length == 3, "key_range used", double(length), 3);
  ok = seqfast::key_range(cu, used, 2, start, length);
  expect(!ok, "key_range beyond capacity", double(length), 5);
}

template <typename T>
void test_online_softmax(const char* name) {
  std::mt19937 rng(2);
  std::normal_distribution<double> normal(0.0, 4.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 100), block = 1 + static_cast<int>(rng() % 40);
    std::vector<T> s(n);
    double max = -INFINITY;
    for (auto& x : s) {
      x = static_cast<T>(normal(rng) + (trial % 3 == 0 ? 300.0 : 0.0));  // large scores must not overflow
      max = std::fmax(max, double(x));
    }
    double sum = 0;
    for (auto x : s) sum += std::exp(double(x) - max);
    const double want_lse = max + std::log(sum);

    // One key at a time (the CPU kernels), with a context accumulator that must equal sum_j p_j x_j.
    seqfast::OnlineSoftmax<T> one;
    T acc_one = 0;
    for (int j0 = 0; j0 < n; j0 += block) {
      const int m = std::min(block, n - j0);
      T block_max = -INFINITY;
      for (int j = j0; j < j0 + m; ++j) block_max = std::max(block_max, s[j]);
      acc_one *= one.rescale(block_max);
      for (int j = j0; j < j0 + m; ++j) acc_one += one.add(s[j]) * T(j % 7);
    }
    // A block sum at a time (the CUDA kernels).
    seqfast::OnlineSoftmax<T> blocked;
    T acc_blocked = 0;
    for (int j0 = 0; j0 < n; j0 += block) {
      const int m = std::min(block, n - j0);
      T block_max = -INFINITY;
      for (int j = j0; j < j0 + m; ++j) block_max = std::max(block_max, s[j]);
      acc_blocked *= blocked.rescale(block_max);
      T block_sum = 0;
      for (int j = j0; j < j0 + m; ++j) {
        const T e = blocked.shifted_exp(s[j]);
        block_sum += e;
        acc_blocked += e * T(j % 7);
      }
      blocked.add_block_sum(block_sum);
    }
    double want_acc = 0;
    for (int j = 0; j < n; ++j) want_acc += std::exp(double(s[j]) - want_lse) * (j % 7);
    const double tol = sizeof(T) == 4 ? 2e-5 : 1e-12;
    expect_near(name, double(one.lse()), want_lse, tol * std::fabs(want_lse) + tol);
    expect_near(name, double(blocked.lse()), want_lse, tol * std::fabs(want_lse) + tol);
    expect_near(name, double(acc_one / one.sum), want_acc, tol * 10);
    expect_near(name, double(acc_blocked / blocked.sum), want_acc, tol * 10);
    double weight_sum = 0;
    for (auto x : s) weight_sum += double(blocked.weight(x));
    expect_near(name, weight_sum, 1.0, tol * 10);
  }
  seqfast::OnlineSoftmax<T> empty;
  expect(std::isinf(double(empty.lse())) && empty.lse() < 0, "lse of no keys is -inf", double(empty.lse()), -INFINITY);
}

void test_additive_gradient() {
  // d/dx [v * tanh(x)] = v (1 - tanh^2 x), scaled by ds.
  for (double x = -3; x <= 3; x += 0.37) {
    const double v = 0.7, ds = -1.3, h = 1e-6;
    const double fd = ds * (v * std::tanh(x + h) - v * std::tanh(x - h)) / (2 * h);
    double dv = 0;
    const double t = seqfast::additive_tanh(x, 0.0);
    expect_near("additive_pre_grad", seqfast::additive_backward(ds, v, t, dv), fd, 1e-8);
    expect_near("additive dv", dv, ds * std::tanh(x), 1e-15);
  }
}

}  // namespace

int main() {
  test_sequence_of_row();
  test_key_range();
  test_online_softmax<float>("online softmax float");
  test_online_softmax<double>("online softmax double");
  test_additive_gradient();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all attention math checks passed\n");
  return 0;
}
