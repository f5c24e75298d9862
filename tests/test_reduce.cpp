// Reductions: sum/mean (row, column and split paths), max/argmax with the
// gradient routed to the first maximum, and CPU-vs-CUDA parity.
#include <cmath>
#include <limits>

#include "cpu/reduce.h"
#include "cuda/reduce.h"
#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

TensorOptions f64_grad() { return {DType::Float64, Device::cpu(), true}; }

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }
std::vector<int32_t> ints(const Tensor& t) { return t.to_vector<int32_t>(); }

}  // namespace

TEST_CASE("sum and mean: exact values, dims, keepdim") {
  Tensor x = from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3});
  CHECK(ops::sum(x).item<double>() == 21);
  CHECK(ops::mean(x).item<double>() == 3.5);
  CHECK(values(ops::sum(x, {0})) == std::vector<double>{5, 7, 9});
  CHECK(values(ops::sum(x, {1})) == std::vector<double>{6, 15});
  CHECK(values(ops::mean(x, {-1})) == std::vector<double>{2, 5});
  CHECK(ops::sum(x, {0}, true).shape() == Shape{1, 3});
  CHECK(ops::sum(x, {0, 1}, true).shape() == Shape{1, 1});
  // Leading dims of a contiguous input take the column path.
  Tensor y = from_vector(std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, {2, 2, 3});
  CHECK(values(ops::sum(y, {0, 1})) == std::vector<double>{22, 26, 30});
  CHECK(values(ops::sum(y, {0})) == std::vector<double>{8, 10, 12, 14, 16, 18});
  CHECK(values(ops::sum(y, {1})) == std::vector<double>{5, 7, 9, 17, 19, 21});
  CHECK(values(ops::sum_to(y, {3})) == std::vector<double>{22, 26, 30});
  CHECK(values(ops::sum_to(y, {2, 1, 3})) == std::vector<double>{5, 7, 9, 17, 19, 21});
  // A scalar reduces to itself.
  Tensor s = from_vector(std::vector<double>{4}, {});
  CHECK(ops::sum(s).item<double>() == 4);
  CHECK(ops::sum(s, {0}).item<double>() == 4);
  CHECK(ops::sum(s, {-1}).item<double>() == 4);
  // sum_to reduces only where the target has 1 or a missing dim.
  CHECK_THROWS_WITH_AS(ops::sum_to(ops::ones({2, 6}), {3, 4}),
                       doctest::Contains("sum_to: cannot reduce [2, 6] to [3, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::sum_to(ops::ones({2, 3}), {6}), doctest::Contains("sum_to: cannot reduce [2, 3] to [6]"),
                       Error);
}

TEST_CASE("sum_first matches sum_last on the transpose (CPU kernel, wide and narrow)") {
  for (Shape shape : {Shape{300, 7}, Shape{3, 5000}, Shape{4097, 3}}) {
    Tensor x = random_tensor(shape, {DType::Float32});
    Tensor a = ops::full({shape[1]}, std::nan(""), {DType::Float32});
    cpu::sum_first(x, shape[0], shape[1], 0.5, a);
    Tensor b = ops::mul(ops::sum(x.transpose(0, 1).contiguous(), {1}), 0.5);
    check_close(a, b, 1e-5, 1e-5);
  }
}

TEST_CASE("sum and mean gradcheck: dims, keepdim, non-contiguous") {
  Tensor x = random_tensor({3, 4, 2}, f64_grad());
  CHECK(gradcheck([](const std::vector<Tensor>& v) { return ops::sum(v[0], {1}); }, {x}));
  CHECK(gradcheck([](const std::vector<Tensor>& v) { return ops::sum(v[0], {0, 1}, true); }, {x}));
  CHECK(gradcheck([](const std::vector<Tensor>& v) { return ops::mean(v[0], {0, 2}); }, {x}));
  CHECK(gradcheck([](const std::vector<Tensor>& v) { return ops::mean(v[0]); }, {x}));
  CHECK(gradcheck([](const std::vector<Tensor>& v) { return ops::sum(v[0].transpose(0, 2), {0}); }, {x}));
}

TEST_CASE("max over a dim: values, first index on ties, keepdim") {
  Tensor x = from_vector(std::vector<float>{1, 3, 3, 5, 2, 5}, {2, 3});
  auto [v1, i1] = ops::max(x, 1);
  CHECK(v1.shape() == Shape{2});
  CHECK(values(v1) == std::vector<double>{3, 5});
  CHECK(ints(i1) == std::vector<int32_t>{1, 0});
  CHECK(i1.dtype() == DType::Int32);
  auto [v0, i0] = ops::max(x, 0, true);
  CHECK(v0.shape() == Shape{1, 3});
  CHECK(values(v0) == std::vector<double>{5, 3, 5});
  CHECK(ints(i0) == std::vector<int32_t>{1, 0, 1});
  CHECK(ints(ops::argmax(x, -1)) == std::vector<int32_t>{1, 0});
  CHECK(ops::argmax(x, 0, true).shape() == Shape{1, 3});
  CHECK(ops::max(x).item<float>() == 5);
  // Middle dim of a 3-D tensor.
  Tensor y = from_vector(std::vector<float>{0, 9, 4, 1, 8, 2, 7, 3}, {2, 2, 2});
  auto [vy, iy] = ops::max(y, 1);
  CHECK(values(vy) == std::vector<double>{4, 9, 8, 3});
  CHECK(ints(iy) == std::vector<int32_t>{1, 0, 0, 1});
  // int32 and bfloat16 inputs.
  CHECK(ints(ops::max(from_vector(std::vector<int32_t>{-4, 7, 7}, {3}), 0).first) ==
        std::vector<int32_t>{7});
  CHECK(ints(ops::argmax(x.to(DType::BFloat16), 1)) == std::vector<int32_t>{1, 0});
}

TEST_CASE("max propagates NaN, as the largest value") {
  float nan = std::numeric_limits<float>::quiet_NaN();
  Tensor x = from_vector(std::vector<float>{1, nan, 3, nan}, {4});
  auto [v, i] = ops::max(x, 0);
  CHECK(std::isnan(v.item<float>()));
  CHECK(i.item<int32_t>() == 1);
}

TEST_CASE("max gradient goes to the first maximum only") {
  Tensor x = from_vector(std::vector<double>{2, 2, 1, 0, 3, 3}, {2, 3});
  x.requires_grad_(true);
  ops::sum(ops::max(x, 1).first).backward();
  CHECK(values(x.grad()) == std::vector<double>{1, 0, 0, 0, 1, 0});
  x.zero_grad();
  ops::max(x).backward();
  CHECK(values(x.grad()) == std::vector<double>{0, 0, 0, 0, 1, 0});
  x.zero_grad();
  ops::sum(ops::mul(ops::max(x, 0, true).first, 2.0)).backward();
  CHECK(values(x.grad()) == std::vector<double>{2, 0, 0, 0, 2, 2});
  CHECK_FALSE(ops::max(x, 1).second.requires_grad());  // indices carry no gradient
}

TEST_CASE("max gradcheck: dims, keepdim, non-contiguous, global") {
  Tensor x = random_tensor({3, 4, 5}, f64_grad());
  for (int64_t dim : {0, 1, 2, -1}) {
    for (bool keep : {false, true}) {
      CAPTURE(dim);
      CAPTURE(keep);
      CHECK(gradcheck([=](const std::vector<Tensor>& v) { return ops::max(v[0], dim, keep).first; }, {x}));
      CHECK(gradcheck(
          [=](const std::vector<Tensor>& v) { return ops::max(v[0].transpose(0, 2), dim, keep).first; }, {x}));
    }
  }
  CHECK(gradcheck([](const std::vector<Tensor>& v) { return ops::max(v[0].slice(1, 0, 4, 2)); }, {x}));
}

TEST_CASE("reduction errors") {
  Tensor x = random_tensor({2, 3});
  CHECK_THROWS_WITH_AS(ops::max(x, 2), doctest::Contains("max: dim 2 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::argmax(x, -3), doctest::Contains("argmax: dim -3 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::max(ops::zeros({2, 0}), 1), doctest::Contains("cannot reduce over zero elements"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::max(ops::zeros({0})), doctest::Contains("max: cannot reduce over zero"), Error);
  CHECK_THROWS_WITH_AS(ops::max(Tensor(), 0), doctest::Contains("max: input is an undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::sum(x, {1, 1}), doctest::Contains("sum: dim 1 given twice"), Error);
  // An int32 mean would truncate (PyTorch refuses it as well).
  CHECK_THROWS_WITH_AS(ops::mean(from_vector(std::vector<int32_t>{1, 2}, {2})),
                       doctest::Contains("mean: expected a floating-point tensor"), Error);
}

TEST_CASE("int32 sums are exact inside the int32 range and wrap around past it, on every backend") {
  Tensor small = from_vector(std::vector<int32_t>{2000000000, -1999999999, 7}, {3});
  Tensor big = ops::full({3}, 2e9, {DType::Int32});  // 6e9: wraps to 6e9 - 2^32
  for (bool gpu : {false, true}) {
    if (gpu && !cuda_is_available()) {
      MESSAGE("skipped the CUDA half: no CUDA device");
      continue;
    }
    CAPTURE(gpu);
    const Device d = gpu ? Device::cuda(0) : Device::cpu();
    CHECK(ops::sum(small.to(d)).item<int32_t>() == 8);
    CHECK(ops::sum(big.to(d)).item<int32_t>() == static_cast<int32_t>(6000000000LL - 4294967296LL));
    CHECK(ops::sum(ops::reshape(big, {3, 1}).to(d), {0}).to_vector<int32_t>() ==
          std::vector<int32_t>{static_cast<int32_t>(6000000000LL - 4294967296LL)});
  }
}

// ---- CUDA ----

namespace {

// Forward on CPU and CUDA from the same random input, then backward from the
// same random seed gradient; compares outputs and input gradients.
template <typename Fn>
void check_parity(Fn fn, const Shape& shape, DType dtype, double atol, double rtol) {
  CAPTURE(shape_str(shape));
  CAPTURE(dtype);
  Tensor xc = random_tensor(shape, {dtype, Device::cpu(), true});
  Tensor xg = xc.detach().to(Device::cuda());
  xg.requires_grad_(true);
  Tensor yc = fn(xc), yg = fn(xg);
  REQUIRE(yg.is_cuda());
  check_close(yg, yc, atol, rtol);
  Tensor seed = random_tensor(yc.shape(), {dtype});
  yc.backward(seed);
  yg.backward(seed.to(Device::cuda()));
  check_close(xg.grad(), xc.grad(), atol, rtol);
}

}  // namespace

TEST_CASE("CUDA sum/mean parity: short rows, long rows, split rows, leading dims") {
  MINIDL_REQUIRE_CUDA();
  struct Case {
    Shape shape;
    std::vector<int64_t> dims;
  };
  std::vector<Case> cases = {
      {{513, 65}, {1}},        // a warp per row
      {{37, 3001}, {1}},       // a block per row
      {{3, 200003}, {1}},      // few long rows: split over blocks
      {{1 << 20}, {0}},        // full reduction of a long vector
      {{2048, 384}, {0}},      // bias-gradient shape: columns, several chunks
      {{64, 8, 130}, {0, 1}},  // leading dims
      {{7, 300, 5}, {1}},      // a middle dim (transposed copy)
  };
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    bool bf = dtype == DType::BFloat16;
    for (const Case& c : cases) {
      // Sums of n values in [-1, 1) are O(sqrt n): absolute tolerance scales with it.
      int64_t n = 1;
      for (int64_t d : c.dims) n *= c.shape[static_cast<size_t>(d)];
      double atol = (bf ? 1e-2 : 1e-5) * std::sqrt(static_cast<double>(n));
      check_parity([&](const Tensor& x) { return ops::sum(x, c.dims); }, c.shape, dtype, atol, bf ? 1e-2 : 1e-5);
      check_parity([&](const Tensor& x) { return ops::mean(x, c.dims, true); }, c.shape, dtype,
                   bf ? 1e-2 : 1e-6, bf ? 1e-2 : 1e-5);
    }
  }
  Tensor x = random_tensor({1000, 1000}, {DType::Float32});
  // A full reduction of 10^6 floats: fp32 partials in a fixed order, error far below 1e-2.
  CHECK(std::abs(ops::sum(x.to(Device::cuda())).item<double>() - ops::sum(x).item<double>()) < 1e-2);
}

TEST_CASE("CUDA max/argmax parity and gradient routing") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (Shape shape : {Shape{257, 65}, Shape{9, 5000}, Shape{4, 6, 33}}) {
      for (int64_t dim : {int64_t{0}, int64_t{-1}}) {
        check_parity([&](const Tensor& x) { return ops::max(x, dim).first; }, shape, dtype, 1e-12, 0);
        Tensor x = random_tensor(shape, {dtype});
        CHECK(ints(ops::argmax(x.to(Device::cuda()), dim, true)) == ints(ops::argmax(x, dim, true)));
      }
    }
    check_parity([](const Tensor& x) { return ops::max(x); }, {100000}, dtype, 1e-12, 0);
  }
  // Ties (bfloat16 makes many): the first index wins on both backends.
  Tensor rounded = ops::mul(random_tensor({300, 200}, {DType::BFloat16}), 4.0).to(DType::Float32);
  CHECK(ints(ops::argmax(rounded.to(Device::cuda()), 1)) == ints(ops::argmax(rounded, 1)));
  CHECK(ints(ops::argmax(rounded.to(Device::cuda()), 0)) == ints(ops::argmax(rounded, 0)));
  float nan = std::numeric_limits<float>::quiet_NaN();
  Tensor xn = from_vector(std::vector<float>{1, 2, nan, 5, nan}, {1, 5});
  auto [vn, in] = ops::max(xn.to(Device::cuda()), 1);
  CHECK(std::isnan(vn.item<float>()));
  CHECK(in.item<int32_t>() == 2);
}

#if defined(MINIDL_WITH_CUDA)
TEST_CASE("CUDA reduction kernels write every output (poisoned buffers)") {
  MINIDL_REQUIRE_CUDA();
  Device gpu = Device::cuda();
  for (Shape shape : {Shape{37, 65}, Shape{5, 3001}, Shape{2, 100000}}) {
    int64_t rows = shape[0], cols = shape[1];
    Tensor x = random_tensor(shape, {DType::Float32});
    Tensor xg = x.to(gpu);
    Tensor sc = ops::full({rows}, std::nan(""), {DType::Float32});
    Tensor sg = ops::full({rows}, std::nan(""), {DType::Float32, gpu});
    cpu::sum_last(x, rows, cols, 0.5, sc);
    cuda::sum_last(xg, rows, cols, 0.5, sg);
    check_close(sg, sc, 1e-5 * std::sqrt(static_cast<double>(cols)), 1e-5);
    Tensor fc = ops::full({cols}, std::nan(""), {DType::Float32});
    Tensor fg = ops::full({cols}, std::nan(""), {DType::Float32, gpu});
    cpu::sum_first(x, rows, cols, 2.0, fc);
    cuda::sum_first(xg, rows, cols, 2.0, fg);
    check_close(fg, fc, 1e-5 * rows, 1e-5);
    Tensor vc = ops::full({rows}, std::nan(""), {DType::Float32});
    Tensor vg = ops::full({rows}, std::nan(""), {DType::Float32, gpu});
    Tensor ic = ops::full({rows}, -7, {DType::Int32});
    Tensor ig = ops::full({rows}, -7, {DType::Int32, gpu});
    cpu::max_last(x, rows, cols, vc, ic);
    cuda::max_last(xg, rows, cols, vg, ig);
    check_close(vg, vc, 1e-12, 0);
    CHECK(ints(ig) == ints(ic));
    Tensor g = random_tensor({rows}, {DType::Float32});
    Tensor bc = ops::full(shape, std::nan(""), {DType::Float32});
    Tensor bg = ops::full(shape, std::nan(""), {DType::Float32, gpu});
    cpu::max_last_backward(g, ic, rows, cols, bc);
    cuda::max_last_backward(g.to(gpu), ig, rows, cols, bg);
    check_close(bg, bc, 1e-12, 0);
  }
}
#endif
