// Rotary position embedding (ops::rope): hand-computed values, the rotation
// properties (norms, relative positions), gradchecks through strided views,
// accuracy at positions near 2^20, CPU-vs-CUDA parity and errors.
#include <cmath>
#include <limits>

#include "cpu/rope.h"
#include "tests/helpers.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/rope.h"
#endif

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64{DType::Float64, Device::cpu(), false};
constexpr int64_t kMillion = int64_t{1} << 20;  // 1,048,576

// Sum over the last dim of a * b: (B, N, H, D) -> (B, N, H).
std::vector<double> row_dots(const Tensor& a, const Tensor& b) {
  return ops::sum(ops::mul(a, b), {3}).to_vector<double>();
}

// The rotation written out from its definition, in double, for any dtype.
Tensor rope_by_definition(const Tensor& x, int64_t offset, double base) {
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), D = x.size(3);
  std::vector<double> v = x.contiguous().to_vector<double>(), out(v.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          double theta = static_cast<double>(offset + n) * std::pow(base, -2.0 * i / D);
          size_t at = static_cast<size_t>(((b * N + n) * H + h) * D + 2 * i);
          out[at] = v[at] * std::cos(theta) - v[at + 1] * std::sin(theta);
          out[at + 1] = v[at] * std::sin(theta) + v[at + 1] * std::cos(theta);
        }
  return from_vector(out, x.shape());
}

}  // namespace

TEST_CASE("rope: hand-computed values (interleaved pairs, angle (offset + n) base^(-2i/D))") {
  // D = 4, base 4: pair 0 turns by pos rad, pair 1 by pos / 2 rad.
  Tensor x = from_vector(std::vector<double>{1, 2, 3, 4, 1, 2, 3, 4, -1, 0.5, 0, 2}, {1, 3, 1, 4});
  std::vector<double> got = ops::rope(x, 0, 4.0).to_vector<double>();
  const double c1 = std::cos(1.0), s1 = std::sin(1.0), c2 = std::cos(2.0), s2 = std::sin(2.0);
  const double ch = std::cos(0.5), sh = std::sin(0.5);
  std::vector<double> want = {
      1, 2, 3, 4,                                                  // n = 0: no turn
      1 * c1 - 2 * s1, 1 * s1 + 2 * c1, 3 * ch - 4 * sh, 3 * sh + 4 * ch,  // pos 1
      -1 * c2 - 0.5 * s2, -1 * s2 + 0.5 * c2, 0 * c1 - 2 * s1, 0 * s1 + 2 * c1,  // pos 2
  };
  check_close(from_vector(got, {1, 3, 1, 4}), from_vector(want, {1, 3, 1, 4}), 1e-15, 1e-15);

  // position_offset shifts every row: row n of offset 1 is row n + 1 of offset 0.
  Tensor shifted = ops::rope(x.narrow(1, 0, 2), 1, 4.0);
  std::vector<double> s = shifted.to_vector<double>();
  std::vector<double> row1(s.begin(), s.begin() + 4);
  check_close(from_vector(row1, {4}),
              from_vector(std::vector<double>(want.begin() + 4, want.begin() + 8), {4}), 1e-15, 1e-15);

  // The default base 10000 with D = 2 is one pair turning by pos rad; quarter
  // turns at pos = pi/2 multiples are not integers, so check pos 3 directly.
  Tensor e = from_vector(std::vector<double>{1, 0}, {1, 1, 1, 2});
  std::vector<double> r = ops::rope(e, 3).to_vector<double>();
  CHECK(r[0] == doctest::Approx(std::cos(3.0)).epsilon(1e-15));
  CHECK(r[1] == doctest::Approx(std::sin(3.0)).epsilon(1e-15));

  // Every dtype against the definition (bfloat16 rounds the result).
  Tensor big = random_tensor({2, 5, 3, 8});
  Tensor want_big = rope_by_definition(big, 7, 10000.0);
  check_close(ops::rope(big, 7), want_big, 1e-14, 1e-14);
  check_close(ops::rope(big.to(DType::Float32), 7), want_big, 1e-6, 1e-6);
  check_close(ops::rope(big.to(DType::BFloat16), 7), rope_by_definition(big.to(DType::BFloat16), 7, 1e4),
              4e-3, 8e-3);
  CHECK(ops::rope(big.to(DType::BFloat16)).dtype() == DType::BFloat16);
}

TEST_CASE("rope: rotation keeps every pair's norm and is undone by the negative angle") {
  Tensor x = random_tensor({2, 9, 3, 6});
  Tensor y = ops::rope(x, 11, 500.0);
  Tensor pair_norm_x = ops::sum(ops::mul(x, x).view({2, 9, 3, 3, 2}), {4});
  Tensor pair_norm_y = ops::sum(ops::mul(y, y).view({2, 9, 3, 3, 2}), {4});
  check_close(pair_norm_y, pair_norm_x, 1e-14, 1e-14);
  // The backward of rope is the inverse rotation: vjp with seed y gives x back.
  Tensor leaf = ops::clone(x).requires_grad_(true);
  Tensor out = ops::rope(leaf, 11, 500.0);
  out.backward(y);
  check_close(leaf.grad(), x, 1e-14, 1e-14);
}

TEST_CASE("rope: <rope(q, m), rope(k, n)> depends only on m - n") {
  const int64_t D = 16;
  Tensor q = random_tensor({1, 1, 1, D}), k = random_tensor({1, 1, 1, D});
  auto score = [&](int64_t m, int64_t n) {
    return row_dots(ops::rope(q, m), ops::rope(k, n))[0];
  };
  const double at_3 = score(5, 2);
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{
           {3, 0}, {13, 10}, {103, 100}, {kMillion + 3, kMillion}, {-7, -10}}) {
    CAPTURE(m);
    CHECK(score(m, n) == doctest::Approx(at_3).epsilon(1e-9));
  }
  const double at_0 = score(0, 0);
  CHECK(score(kMillion, kMillion) == doctest::Approx(at_0).epsilon(1e-9));
  CHECK(at_0 == doctest::Approx(row_dots(q, k)[0]).epsilon(1e-12));  // same position: plain dot
  CHECK(std::abs(score(6, 2) - at_3) > 1e-3);                        // other offsets differ

  // The same inside one sequence: rows m and n of one call.
  Tensor qs = ops::mul(ops::ones({1, 8, 1, D}, kF64), q), ks = ops::mul(ops::ones({1, 8, 1, D}, kF64), k);
  std::vector<double> rq = ops::rope(qs).to_vector<double>(), rk = ops::rope(ks).to_vector<double>();
  auto dot_rows = [&](int64_t m, int64_t n) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += rq[m * D + d] * rk[n * D + d];
    return s;
  };
  CHECK(dot_rows(7, 4) == doctest::Approx(at_3).epsilon(1e-12));
  CHECK(dot_rows(3, 0) == doctest::Approx(at_3).epsilon(1e-12));
}

TEST_CASE("rope gradcheck (float64): contiguous, strided heads, strided D, offset and base") {
  // Contiguous.
  Tensor x = random_tensor({2, 4, 3, 6}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck([](const std::vector<Tensor>& in) { return ops::rope(in[0]); }, {x}));
  CHECK(gradcheck([](const std::vector<Tensor>& in) { return ops::rope(in[0], 1000, 77.0); }, {x}));
  // (B, H, N, D) storage viewed as (B, N, H, D): D contiguous, the rest strided.
  Tensor bhnd = random_tensor({2, 3, 4, 6}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck([](const std::vector<Tensor>& in) { return ops::rope(in[0].transpose(1, 2), 5); },
                  {bhnd}));
  // A (B, T, 3C) projection viewed as k: what the attention layers pass.
  Tensor qkv = random_tensor({2, 5, 3 * 8}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) { return ops::rope(in[0].narrow(2, 8, 8).view({2, 5, 2, 4})); },
      {qkv}));
  // D strided (copied once inside the op).
  Tensor dn = random_tensor({2, 6, 4, 3}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck([](const std::vector<Tensor>& in) { return ops::rope(in[0].permute({0, 3, 2, 1}), 2); },
                  {dn}));
  // Composed with other ops, so upstream gradients are non-trivial.
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) { return ops::tanh(ops::mul(ops::rope(in[0], 3), in[0])); }, {x}));
}

TEST_CASE("rope: float32 stays accurate at positions near 1,048,576") {
  // At pos 2^20 the fastest pair turns by ~1e6 rad: a float32 angle would be
  // off by ~0.03 rad there. The kernels form and reduce the angle in double.
  Tensor x = random_tensor({1, 64, 2, 64});
  for (int64_t offset : {kMillion - 32, kMillion * 8 - 1}) {
    CAPTURE(offset);
    Tensor want = ops::rope(x, offset);  // float64: angles and sin/cos in double
    check_close(want, rope_by_definition(x, offset, 10000.0), 1e-9, 1e-9);
    check_close(ops::rope(x.to(DType::Float32), offset), want, 1e-6, 1e-6);
  }
  // A full 1,048,576-long sequence (one head, D = 2: the pair turns by pos rad).
  Tensor ones_seq = ops::ones({1, kMillion, 1, 2});
  Tensor y = ops::rope(ones_seq);
  std::vector<float> last = y.narrow(1, kMillion - 1, 1).to_vector<float>();
  const double theta = static_cast<double>(kMillion - 1);
  CHECK(last[0] == doctest::Approx(std::cos(theta) - std::sin(theta)).epsilon(1e-6));
  CHECK(last[1] == doctest::Approx(std::sin(theta) + std::cos(theta)).epsilon(1e-6));
}

TEST_CASE("rope kernel writes every output element (poisoned buffer)") {
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float64}) {
    CAPTURE(dtype);
    // (B, H, N, D) storage seen as (B, N, H, D): the kernel reads it in place.
    Tensor x = random_tensor({2, 3, 5, 8}, {dtype}).transpose(1, 2);
    Tensor out = ops::full({2, 5, 3, 8}, std::numeric_limits<double>::quiet_NaN(), {dtype});
    cpu::rope(x, 4, 10000.0, /*inverse=*/false, out);
    const double tol = dtype == DType::BFloat16 ? 4e-3 : 1e-6;
    check_close(out, rope_by_definition(x, 4, 10000.0), tol, 2 * tol);
    Tensor back = ops::full({2, 5, 3, 8}, std::numeric_limits<double>::quiet_NaN(), {dtype});
    cpu::rope(out, 4, 10000.0, /*inverse=*/true, back);
    check_close(back, x, 2 * tol, 4 * tol);
  }
}

TEST_CASE("rope: empty sequences give empty outputs") {
  Tensor x = random_tensor({2, 0, 3, 4}, {DType::Float64, Device::cpu(), true});
  Tensor y = ops::rope(x);
  CHECK(y.shape() == Shape{2, 0, 3, 4});
  ops::sum(y).backward();
  CHECK(x.grad().shape() == Shape{2, 0, 3, 4});
}

TEST_CASE("rope errors name the problem") {
  CHECK_THROWS_WITH_AS(ops::rope(Tensor()), doctest::Contains("rope: x is an undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::rope(ops::zeros({2, 3, 4})),
                       doctest::Contains("rope: x must be 4-D (B, N, H, D), got float32 [2, 3, 4] on cpu"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::rope(ops::zeros({1, 2, 3, 5})),
                       doctest::Contains("rope: head dim D must be even and positive (pairs (x[2i], "
                                         "x[2i+1]) rotate together), got D = 5"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::rope(ops::zeros({1, 2, 3, 4}, {DType::Int32})),
                       doctest::Contains("rope: unsupported dtype (x is int32 [1, 2, 3, 4] on cpu)"), Error);
  CHECK_THROWS_WITH_AS(ops::rope(ops::zeros({1, 2, 3, 4}), 0, 0.0),
                       doctest::Contains("rope: base must be positive and finite, got 0"), Error);
  CHECK_THROWS_WITH_AS(ops::rope(ops::zeros({1, 2, 3, 4}), int64_t{1} << 60),
                       doctest::Contains("rope: positions position_offset + n must stay within +-2^53"),
                       Error);
}

// ---- CUDA ----

TEST_CASE("CUDA rope matches the CPU, float32 and bfloat16, positions near 1,048,576") {
  MINIDL_REQUIRE_CUDA();
  struct Case {
    Shape shape;
    int64_t offset;
    double base;
  };
  // D = 64 and 32 (a warp spans one and two rows), odd B*N*H, a strided view.
  for (const Case& c : {Case{{2, 37, 3, 64}, 0, 10000.0}, Case{{1, 257, 8, 32}, kMillion - 128, 10000.0},
                        Case{{3, 5, 2, 6}, 12345, 500.0}}) {
    CAPTURE(shape_str(c.shape));
    CAPTURE(c.offset);
    Tensor x64 = random_tensor(c.shape);
    Tensor want = ops::rope(x64, c.offset, c.base);
    // float32: both backends reduce the angle in double, then fp32 sin/cos.
    Tensor x32 = x64.to(DType::Float32);
    Tensor got32 = ops::rope(x32.to(Device::cuda()), c.offset, c.base);
    CHECK(got32.is_cuda());
    check_close(got32, ops::rope(x32, c.offset, c.base), 1e-6, 1e-6);
    check_close(got32, want, 1e-6, 1e-6);
    // bfloat16: same bf16 inputs; results may differ by one bf16 rounding.
    Tensor xb = x64.to(DType::BFloat16);
    check_close(ops::rope(xb.to(Device::cuda()), c.offset, c.base), ops::rope(xb, c.offset, c.base),
                4e-3, 8e-3);
  }
  // Strided (B, H, N, D) storage and a strided D dim.
  Tensor bhnd = random_tensor({2, 4, 33, 64}, {DType::Float32});
  check_close(ops::rope(bhnd.to(Device::cuda()).transpose(1, 2), kMillion),
              ops::rope(bhnd.transpose(1, 2), kMillion), 1e-6, 1e-6);
  Tensor dn = random_tensor({2, 8, 3, 5}, {DType::Float32});
  check_close(ops::rope(dn.to(Device::cuda()).permute({0, 3, 2, 1}), 9),
              ops::rope(dn.permute({0, 3, 2, 1}), 9), 1e-6, 1e-6);
}

TEST_CASE("CUDA rope: a full 1,048,576-long sequence, forward and backward") {
  MINIDL_REQUIRE_CUDA();
  // B = 1, N = 2^20, H = 2, D = 32 (64 Mi float32 elements): the gradient of
  // |rope(x)|^2 is 2x exactly when the backward undoes the forward rotation;
  // sampled rows are checked against the float64 CPU op.
  const int64_t N = kMillion, H = 2, D = 32;
  Tensor x = ops::rand({1, N, H, D}, {DType::Float32, Device::cuda(), false});
  Tensor leaf = x.clone().requires_grad_(true);
  Tensor y = ops::rope(leaf);
  ops::sum(ops::mul(y, y)).backward();  // d/dx |R x|^2 = 2 x
  // Reduced on the device: 64 Mi elements are slow to compare on the host.
  Tensor diff = ops::sub(leaf.grad(), ops::mul(x, 2.0));
  CHECK(std::sqrt(ops::max(ops::mul(diff, diff)).item<float>()) <= 1e-5);
  for (int64_t n : {int64_t{0}, int64_t{777}, N / 2 + 1, N - 1}) {
    CAPTURE(n);
    Tensor row = x.narrow(1, n, 1).to(Device::cpu()).to(DType::Float64);
    check_close(y.narrow(1, n, 1), ops::rope(row, n), 1e-6, 1e-6);
  }
}

#if defined(MINIDL_WITH_CUDA)
TEST_CASE("CUDA rope kernel writes every output element (poisoned buffer)") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    Tensor x = random_tensor({3, 17, 5, 64}, {dtype, Device::cuda(), false});
    Tensor out = ops::full(x.shape(), std::numeric_limits<double>::quiet_NaN(), {dtype, Device::cuda(), false});
    const double tol = dtype == DType::BFloat16 ? 4e-3 : 1e-6;  // bf16: one rounding apart
    cuda::rope(x, 3, 10000.0, /*inverse=*/false, out);
    check_close(out, ops::rope(x.to(Device::cpu()), 3), tol, 2 * tol);
    Tensor want_inverse = Tensor::empty(x.shape(), {dtype});
    cpu::rope(x.to(Device::cpu()), 3, 10000.0, /*inverse=*/true, want_inverse);
    ops::fill_(out, std::numeric_limits<double>::quiet_NaN());
    cuda::rope(x, 3, 10000.0, /*inverse=*/true, out);
    check_close(out, want_inverse, tol, 2 * tol);
  }
}
#endif

TEST_CASE("CUDA rope errors") {
  MINIDL_REQUIRE_CUDA();
  CHECK_THROWS_WITH_AS(ops::rope(ops::zeros({1, 2, 3, 4}, {DType::Float64, Device::cuda(), false})),
                       doctest::Contains("rope: float64 is supported on the CPU only"), Error);
}
