#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

TEST_CASE("tensor metadata and from_vector round trip") {
  Tensor t = from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  CHECK(t.shape() == Shape{2, 3});
  CHECK(t.strides() == Shape{3, 1});
  CHECK(t.dtype() == DType::Float32);
  CHECK(t.is_contiguous());
  CHECK(t.to_vector<float>() == std::vector<float>{1, 2, 3, 4, 5, 6});
}

TEST_CASE("views share storage: writes through a view land in the base") {
  Tensor base = ops::zeros({3, 4});
  Tensor row = base.slice(0, 1, 2);
  ops::fill_(row, 7.0);
  Tensor col = base.transpose(0, 1).slice(0, 3, 4);
  ops::fill_(col, 2.0);
  std::vector<float> v = base.to_vector<float>();
  CHECK(v == std::vector<float>{0, 0, 0, 2, 7, 7, 7, 2, 0, 0, 0, 2});
}

TEST_CASE("elementwise broadcasting gradcheck") {
  Tensor a = random_tensor({3, 1, 4}, {DType::Float64, Device::cpu(), true});
  Tensor b = random_tensor({2, 4}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck([](const std::vector<Tensor>& x) { return ops::mul(ops::add(x[0], x[1]), x[0]); },
                  {a, b}));
  CHECK(gradcheck([](const std::vector<Tensor>& x) { return ops::div(ops::tanh(x[0]), ops::add(ops::exp(x[1]), 1.0)); },
                  {a, b}));
}

TEST_CASE("backward errors") {
  Tensor a = random_tensor({3}, {DType::Float64, Device::cpu(), true});
  Tensor y = ops::mul(a, 2.0);
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("not a scalar"), Error);
  Tensor s = ops::sum(ops::exp(a));
  s.backward();
  CHECK_THROWS_WITH_AS(s.backward(), doctest::Contains("freed"), Error);
  Tensor w = random_tensor({3});
  Tensor z = ops::sum(ops::mul(a, w));
  ops::mul_(w, 3.0);
  CHECK_THROWS_WITH_AS(z.backward(), doctest::Contains("modified in place"), Error);
}
