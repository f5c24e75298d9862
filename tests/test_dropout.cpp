// dropout: the mask is philox::uniform(seed, offset, i) >= p for one reserved
// generator offset, identical on CPU and CUDA, regenerated in backward.
#include <cmath>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

double fraction_zero(const Tensor& t) {
  std::vector<double> v = t.to_vector<double>();
  double zeros = 0;
  for (double x : v) zeros += x == 0.0;
  return zeros / static_cast<double>(v.size());
}

}  // namespace

TEST_CASE("dropout is the identity when not training or p == 0") {
  Tensor x = random_tensor({4, 5}, {DType::Float32});
  Generator gen(3);
  CHECK(ops::dropout(x, 0.5, false, &gen).storage() == x.storage());
  CHECK(ops::dropout(x, 0.0, true, &gen).storage() == x.storage());
  CHECK(gen.offset() == 0);  // no random numbers were drawn
}

TEST_CASE("dropout errors") {
  Tensor x = random_tensor({3}, {DType::Float32});
  for (double p : {-0.1, 1.0, 1.5, std::nan("")}) {
    CAPTURE(p);
    CHECK_THROWS_WITH_AS(ops::dropout(x, p, true), doctest::Contains("dropout: p must be in [0, 1), got"),
                         Error);
  }
  CHECK_THROWS_WITH_AS(ops::dropout(ops::zeros({3}, {DType::Int32}), 0.5, true),
                       doctest::Contains("dropout: expected a floating-point tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::dropout(Tensor(), 0.5, true),
                       doctest::Contains("dropout: input is an undefined tensor"), Error);
}

TEST_CASE("dropout mask is uniform >= p from the generator's next offset") {
  const int64_t n = 4099;  // not a multiple of 4: the tail of the last Philox block
  for (double p : {0.1, 0.5, 0.7}) {
    CAPTURE(p);
    Generator g_drop(42), g_rand(42);
    g_drop.set_state(42, 5);
    g_rand.set_state(42, 5);
    Tensor y = ops::dropout(ops::ones({n}), p, true, &g_drop);
    CHECK(g_drop.offset() == 6);  // exactly one offset reserved
    std::vector<float> u = ops::rand({n}, {}, &g_rand).to_vector<float>();
    std::vector<float> v = y.to_vector<float>();
    const float scale = static_cast<float>(1.0 / (1.0 - p));
    int64_t mismatches = 0;
    for (int64_t i = 0; i < n; ++i)
      mismatches += v[static_cast<size_t>(i)] != (u[static_cast<size_t>(i)] >= p ? scale : 0.0f);
    CHECK(mismatches == 0);
  }
}

TEST_CASE("dropout drops a fraction near p and keeps the mean") {
  const int64_t n = 1 << 20;
  Tensor x = ops::ones({n});
  for (double p : {0.1, 0.5, 0.9}) {
    CAPTURE(p);
    Generator gen(7);
    Tensor y = ops::dropout(x, p, true, &gen);
    // Binomial standard deviation sqrt(p (1-p) / n) <= 5e-4; allow ~10 sigma.
    CHECK(std::abs(fraction_zero(y) - p) < 5e-3);
    CHECK(std::abs(ops::mean(y).item<double>() - 1.0) < 0.05);
  }
}

TEST_CASE("dropout: same generator state, same mask; next call, new mask") {
  Tensor x = random_tensor({64, 33}, {DType::Float32});
  Generator a(99), b(99);
  Tensor y1 = ops::dropout(x, 0.3, true, &a);
  Tensor y2 = ops::dropout(x, 0.3, true, &b);
  CHECK(y1.to_vector<float>() == y2.to_vector<float>());
  Tensor y3 = ops::dropout(x, 0.3, true, &a);
  CHECK(y3.to_vector<float>() != y1.to_vector<float>());
  // The default generator is used when none is given.
  manual_seed(5);
  Tensor d1 = ops::dropout(x, 0.3, true);
  manual_seed(5);
  Tensor d2 = ops::dropout(x, 0.3, true);
  CHECK(d1.to_vector<float>() == d2.to_vector<float>());
}

TEST_CASE("dropout masks by logical (row-major) index, whatever the strides") {
  Tensor base = random_tensor({6, 10}, {DType::Float32});
  Tensor strided = base.transpose(0, 1).slice(0, 1, 10, 2);  // (5, 6), non-contiguous
  Generator a(1), b(1);
  Tensor y_strided = ops::dropout(strided, 0.4, true, &a);
  Tensor y_dense = ops::dropout(strided.contiguous(), 0.4, true, &b);
  CHECK(y_strided.is_contiguous());
  CHECK(y_strided.to_vector<float>() == y_dense.to_vector<float>());
}

TEST_CASE("dropout backward regenerates the mask from (seed, offset)") {
  Tensor x = random_tensor({50, 7}, {DType::Float64, Device::cpu(), true});
  Generator gen(2024);
  const double p = 0.35;
  Tensor y = ops::dropout(x, p, true, &gen);
  ops::rand({100}, {}, &gen);  // advancing the generator must not change the backward mask
  Tensor seed = random_tensor({50, 7});
  y.backward(seed);
  std::vector<double> yv = y.to_vector<double>(), xv = x.detach().to_vector<double>(),
                      gv = seed.to_vector<double>(), dx = x.grad().to_vector<double>();
  const double scale = 1.0 / (1.0 - p);
  for (size_t i = 0; i < yv.size(); ++i) {
    bool kept = yv[i] != 0.0;
    CHECK(yv[i] == (kept ? xv[i] * scale : 0.0));
    CHECK(dx[i] == (kept ? gv[i] * scale : 0.0));
  }
}

TEST_CASE("dropout gradcheck with a fixed generator") {
  Tensor x = random_tensor({5, 6}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) {
        Generator gen(77);  // the same mask on every evaluation
        return ops::dropout(ops::tanh(in[0]), 0.4, true, &gen);
      },
      {x}));
  Tensor xt = random_tensor({6, 5}).transpose(0, 1);
  xt.requires_grad_(true);
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) {
        Generator gen(78);
        return ops::dropout(in[0], 0.2, true, &gen);
      },
      {xt}));
}

TEST_CASE("dropout CUDA drops exactly the CPU elements (float32, bfloat16, float64)") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float64}) {
    CAPTURE(dtype);
    Tensor x_cpu = random_tensor({257, 129}, {dtype, Device::cpu(), true});
    Tensor x_cuda = x_cpu.detach().to(Device::cuda()).requires_grad_(true);
    Generator g_cpu(31), g_cuda(31);
    g_cpu.set_state(31, 12);
    g_cuda.set_state(31, 12);
    Tensor y_cpu = ops::dropout(x_cpu, 0.25, true, &g_cpu);
    Tensor y_cuda = ops::dropout(x_cuda, 0.25, true, &g_cuda);
    check_close(y_cuda, y_cpu, 0, 0);  // same mask, same single multiply: bit-exact
    Tensor seed = random_tensor({257, 129}, {dtype});
    y_cpu.backward(seed);
    y_cuda.backward(seed.to(Device::cuda()));
    check_close(x_cuda.grad(), x_cpu.grad(), 0, 0);
  }
  // Strided CUDA input.
  Tensor base = random_tensor({40, 30}, {DType::Float32});
  Generator a(8), b(8);
  Tensor y_cpu = ops::dropout(base.transpose(0, 1), 0.5, true, &a);
  Tensor y_cuda = ops::dropout(base.to(Device::cuda()).transpose(0, 1), 0.5, true, &b);
  check_close(y_cuda, y_cpu, 0, 0);
}

TEST_CASE("dropout CUDA: fraction dropped near p") {
  MINIDL_REQUIRE_CUDA();
  Generator gen(12);
  Tensor y = ops::dropout(ops::ones({1 << 20}, {DType::BFloat16, Device::cuda()}), 0.2, true, &gen);
  CHECK(std::abs(fraction_zero(y) - 0.2) < 5e-3);
}
