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

TEST_CASE("dtypes, devices and shape helpers") {
  CHECK(element_size(DType::Float32) == 4);
  CHECK(element_size(DType::Float64) == 8);
  CHECK(element_size(DType::BFloat16) == 2);
  CHECK(element_size(DType::Int32) == 4);
  CHECK(std::string(dtype_name(DType::BFloat16)) == "bfloat16");
  CHECK(Device::parse("cpu") == Device::cpu());
  CHECK(Device::parse("cuda") == Device::cuda(0));
  CHECK(Device::parse("cuda:3") == Device::cuda(3));
  CHECK(Device::cuda(1).str() == "cuda:1");
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:1x", ""})
    CHECK_THROWS_WITH_AS(Device::parse(bad), doctest::Contains("Device::parse: expected"), Error);
  CHECK(contiguous_strides({2, 3, 4}) == Shape{12, 4, 1});
  CHECK(contiguous_strides({}) == Shape{});
  CHECK(numel({}) == 1);
  CHECK(numel({3, 0}) == 0);
  CHECK(shape_str({2, 3}) == "[2, 3]");
  CHECK(wrap_dim(-1, 3, "op") == 2);
  CHECK_THROWS_WITH_AS(wrap_dim(3, 3, "myop"), doctest::Contains("myop: dim 3 is out of range for a tensor of 3 dims"),
                       Error);
  CHECK(broadcast_shapes({3, 1, 5}, {4, 1}, "op") == Shape{3, 4, 5});
  CHECK(broadcast_shapes({}, {2}, "op") == Shape{2});
  CHECK_THROWS_WITH_AS(broadcast_shapes({2, 3}, {4}, "myop"),
                       doctest::Contains("myop: shapes [2, 3] and [4] are not broadcastable"), Error);
}

TEST_CASE("bfloat16 rounds to nearest even and keeps NaN and infinities") {
  CHECK(static_cast<float>(BFloat16(1.0f)) == 1.0f);
  CHECK(static_cast<float>(BFloat16(1.0f + 1.0f / 256)) == 1.0f);           // tie -> even (down)
  CHECK(static_cast<float>(BFloat16(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);  // tie -> even (up)
  CHECK(static_cast<float>(BFloat16(1.0f + 1.5f / 256)) == 1.0f + 2.0f / 256);  // above the tie
  CHECK(static_cast<float>(BFloat16(-2.5f)) == -2.5f);
  CHECK(std::isnan(static_cast<float>(BFloat16(std::nanf("")))));
  CHECK(std::isinf(static_cast<float>(BFloat16(INFINITY))));
  CHECK(static_cast<float>(BFloat16(3.4e38f)) == INFINITY);  // rounds past the largest bfloat16
}

TEST_CASE("host access: item, to_vector, str, from_vector errors") {
  Tensor t = from_vector(std::vector<double>{1.5, -2, 3}, {3});
  CHECK(t.slice(0, 1, 2).item<double>() == -2.0);
  CHECK(t.to_vector<int32_t>() == std::vector<int32_t>{1, -2, 3});
  CHECK_THROWS_WITH_AS(t.item<double>(), doctest::Contains("item: tensor of shape [3] has 3 elements, expected 1"),
                       Error);
  CHECK_THROWS_WITH_AS(from_vector(std::vector<float>{1, 2}, {3}),
                       doctest::Contains("from_vector: 2 values do not fill shape [3]"), Error);
  CHECK_THROWS_WITH_AS(t.data_ptr<float>(), doctest::Contains("data_ptr: tensor is float64, asked for float32"),
                       Error);
  CHECK_THROWS_WITH_AS(Tensor::empty({2, -1}), doctest::Contains("empty: negative size in shape [2, -1]"), Error);
  CHECK_THROWS_WITH_AS(Tensor().shape(), doctest::Contains("use of an undefined Tensor"), Error);
  std::string s = from_vector(std::vector<float>{1, 2, 3, 4}, {2, 2}).str();
  CHECK(s.find("[[1, 2],") != std::string::npos);
  CHECK(s.find("shape=[2, 2], dtype=float32") != std::string::npos);
  std::string long_row = ops::arange(10).str();
  CHECK(long_row.find("0, 1, 2, ..., 7, 8, 9") != std::string::npos);
  CHECK(Tensor().str() == "Tensor(undefined)");
}

TEST_CASE("factories") {
  CHECK(ops::zeros({2, 2}).to_vector<float>() == std::vector<float>{0, 0, 0, 0});
  CHECK(ops::ones({3}, {DType::Int32}).to_vector<int32_t>() == std::vector<int32_t>{1, 1, 1});
  CHECK(ops::full({2}, -1.25, {DType::BFloat16}).to_vector<float>() == std::vector<float>{-1.25f, -1.25f});
  CHECK(ops::arange(4).to_vector<float>() == std::vector<float>{0, 1, 2, 3});
  CHECK(ops::arange(1, 2, 0.25, {DType::Float64}).to_vector<double>() == std::vector<double>{1, 1.25, 1.5, 1.75});
  CHECK(ops::arange(5, 0, -2).to_vector<float>() == std::vector<float>{5, 3, 1});
  CHECK(ops::arange(3, 3, 1).numel() == 0);
  CHECK_THROWS_WITH_AS(ops::arange(0, 1, 0), doctest::Contains("arange: invalid range"), Error);
  Tensor p = ops::zeros({2}, {DType::Float32, Device::cpu(), true});
  CHECK(p.requires_grad());
  CHECK(p.is_leaf());
  Tensor like = ops::ones_like(random_tensor({2, 3}, {DType::BFloat16}));
  CHECK(like.dtype() == DType::BFloat16);
  CHECK(like.shape() == Shape{2, 3});
  CHECK_FALSE(ops::zeros_like(p).requires_grad());
}

TEST_CASE("CPU memory stats follow tensor lifetimes") {
  MemoryStats before = memory_stats(Device::cpu());
  {
    Tensor big = ops::empty({1 << 16}, {DType::Float64});
    CHECK(memory_stats(Device::cpu()).allocated == before.allocated + (size_t{1} << 19));
    CHECK(memory_stats(Device::cpu()).peak_allocated >= before.allocated + (size_t{1} << 19));
  }
  CHECK(memory_stats(Device::cpu()).allocated == before.allocated);
}
