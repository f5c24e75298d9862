// Philox random streams: known-answer vectors, reproducibility by seed and
// offset, CPU == CUDA, and the moments of large samples.
#include <algorithm>
#include <cmath>

#include "core/philox.h"
#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;

namespace {

struct Moments {
  double mean = 0, var = 0, skew = 0, kurt = 0, min = 0, max = 0;
};

Moments moments(const Tensor& t) {
  std::vector<double> v = t.to_vector<double>();
  double n = static_cast<double>(v.size());
  Moments m;
  for (double x : v) m.mean += x;
  m.mean /= n;
  double m2 = 0, m3 = 0, m4 = 0;
  for (double x : v) {
    double d = x - m.mean;
    m2 += d * d;
    m3 += d * d * d;
    m4 += d * d * d * d;
  }
  m.var = m2 / n;
  m.skew = (m3 / n) / std::pow(m.var, 1.5);
  m.kurt = (m4 / n) / (m.var * m.var);
  m.min = *std::min_element(v.begin(), v.end());
  m.max = *std::max_element(v.begin(), v.end());
  return m;
}

}  // namespace

TEST_CASE("Philox-4x32-10 matches the Random123 known-answer vectors") {
  using philox::philox4x32;
  philox::U32x4 a = philox4x32({0, 0, 0, 0}, 0);
  CHECK(a.x == 0x6627e8d5u);
  CHECK(a.y == 0xe169c58du);
  CHECK(a.z == 0xbc57ac4cu);
  CHECK(a.w == 0x9b00dbd8u);
  philox::U32x4 b = philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, ~uint64_t{0});
  CHECK(b.x == 0x408f276du);
  CHECK(b.y == 0x41c83b0eu);
  CHECK(b.z == 0xa20bc7c6u);
  CHECK(b.w == 0x6d5451fdu);
  philox::U32x4 c = philox4x32({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                               (uint64_t{0x299f31d0u} << 32) | 0xa4093822u);
  CHECK(c.x == 0xd16cfe09u);
  CHECK(c.y == 0x94fdccebu);
  CHECK(c.z == 0x5001e420u);
  CHECK(c.w == 0x24126ea1u);
}

TEST_CASE("Philox-4x32-7 (the attention-dropout mask's) matches the Random123 known-answer vectors") {
  using philox::philox4x32;
  philox::U32x4 a = philox4x32<7>({0, 0, 0, 0}, 0);
  CHECK(a.x == 0x5f6fb709u);
  CHECK(a.y == 0x0d893f64u);
  CHECK(a.z == 0x4f121f81u);
  CHECK(a.w == 0x4f730a48u);
  philox::U32x4 b = philox4x32<7>({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, ~uint64_t{0});
  CHECK(b.x == 0x5207ddc2u);
  CHECK(b.y == 0x45165e59u);
  CHECK(b.z == 0x4d8ee751u);
  CHECK(b.w == 0x8c52f662u);
  philox::U32x4 c = philox4x32<7>({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                                  (uint64_t{0x299f31d0u} << 32) | 0xa4093822u);
  CHECK(c.x == 0x4dfccabau);
  CHECK(c.y == 0x190a87f0u);
  CHECK(c.z == 0xc47362bau);
  CHECK(c.w == 0xb6b5242au);
}

TEST_CASE("rand element i is philox::uniform(seed, offset, i)") {
  Generator gen(123);
  gen.set_state(123, 9);
  std::vector<float> v = ops::rand({1001}, {}, &gen).to_vector<float>();
  CHECK(gen.offset() == 10);
  for (uint64_t i : {0ull, 1ull, 2ull, 3ull, 4ull, 517ull, 1000ull})
    CHECK(v[i] == philox::uniform(123, 9, i));
  Generator gn(123);
  gn.set_state(123, 9);
  std::vector<float> w = ops::randn({1001}, {}, &gn).to_vector<float>();
  for (uint64_t i : {0ull, 1ull, 2ull, 999ull, 1000ull}) CHECK(w[i] == philox::normal(123, 9, i));
}

TEST_CASE("same seed, same stream; each call advances the offset") {
  Generator a(1), b(1), c(2);
  std::vector<float> a1 = ops::rand({300}, {}, &a).to_vector<float>();
  std::vector<float> b1 = ops::rand({300}, {}, &b).to_vector<float>();
  std::vector<float> c1 = ops::rand({300}, {}, &c).to_vector<float>();
  CHECK(a1 == b1);
  CHECK(a1 != c1);
  std::vector<float> a2 = ops::rand({300}, {}, &a).to_vector<float>();
  CHECK(a2 != a1);
  CHECK(a.offset() == 2);
  // Shape does not matter, only (seed, offset) and the linear index: a prefix
  // of a longer draw is the shorter draw.
  Generator d(1);
  std::vector<float> d1 = ops::rand({10, 50}, {}, &d).to_vector<float>();
  CHECK(std::equal(a1.begin(), a1.end(), d1.begin()));
  // manual_seed / set_state reproduce the default generator's stream.
  manual_seed(77);
  std::vector<float> r1 = ops::randn({64}).to_vector<float>();
  std::vector<float> r2 = ops::randn({64}).to_vector<float>();
  manual_seed(77);
  CHECK(ops::randn({64}).to_vector<float>() == r1);
  default_generator().set_state(77, 1);
  CHECK(ops::randn({64}).to_vector<float>() == r2);
  // Other dtypes round the same float stream.
  Generator e(1), f(1);
  std::vector<double> as_f64 = ops::rand({300}, {DType::Float64}, &e).to_vector<double>();
  for (size_t i = 0; i < a1.size(); ++i) CHECK(as_f64[i] == static_cast<double>(a1[i]));
  std::vector<float> as_bf16 = ops::rand({300}, {DType::BFloat16}, &f).to_vector<float>();
  for (size_t i = 0; i < a1.size(); ++i) CHECK(as_bf16[i] == static_cast<float>(BFloat16(a1[i])));
}

TEST_CASE("rand and randn need a floating dtype; requires_grad makes a leaf") {
  CHECK_THROWS_WITH_AS(ops::rand({3}, {DType::Int32}), doctest::Contains("rand: expected a floating-point tensor"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::randn({3}, {DType::Int32}),
                       doctest::Contains("randn: expected a floating-point tensor"), Error);
  Tensor t = ops::randn({3}, {DType::Float64, Device::cpu(), true});
  CHECK(t.requires_grad());
  CHECK(t.is_leaf());
  CHECK(ops::rand({0}).numel() == 0);
}

TEST_CASE("uniform moments on a large sample") {
  Generator gen(2026);
  Moments m = moments(ops::rand({1 << 20}, {}, &gen));
  // Standard error of the mean sqrt(1/12/n) ~ 2.8e-4.
  CHECK(std::abs(m.mean - 0.5) < 2e-3);
  CHECK(std::abs(m.var - 1.0 / 12.0) < 1e-3);
  CHECK(std::abs(m.skew) < 0.01);
  CHECK(std::abs(m.kurt - 1.8) < 0.01);
  CHECK(m.min >= 0.0);
  CHECK(m.max < 1.0);
}

TEST_CASE("normal moments on a large sample") {
  Generator gen(2027);
  Tensor x = ops::randn({1 << 20}, {}, &gen);
  Moments m = moments(x);
  CHECK(std::abs(m.mean) < 5e-3);
  CHECK(std::abs(m.var - 1.0) < 1e-2);
  CHECK(std::abs(m.skew) < 0.02);
  CHECK(std::abs(m.kurt - 3.0) < 0.05);
  std::vector<float> v = x.to_vector<float>();
  double within_one = 0;
  for (float f : v) within_one += std::abs(f) < 1.0f;
  CHECK(std::abs(within_one / static_cast<double>(v.size()) - 0.682689) < 3e-3);
  // Even and odd elements (cosine and sine branches) are each standard normal.
  Moments even = moments(x.slice(0, 0, 1 << 20, 2)), odd = moments(x.slice(0, 1, 1 << 20, 2));
  CHECK(std::abs(even.mean) < 7e-3);
  CHECK(std::abs(odd.mean) < 7e-3);
  CHECK(std::abs(even.var - 1.0) < 1.5e-2);
  CHECK(std::abs(odd.var - 1.0) < 1.5e-2);
}

TEST_CASE("rand on CUDA is bit-exact with the CPU (float32, bfloat16, float64)") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float64}) {
    CAPTURE(dtype);
    Generator a(5), b(5);
    a.set_state(5, 3);
    b.set_state(5, 3);
    Tensor cpu = ops::rand({100003}, {dtype}, &a);
    Tensor gpu = ops::rand({100003}, {dtype, Device::cuda()}, &b);
    CHECK(gpu.is_cuda());
    check_close(gpu, cpu, 0, 0);
    CHECK(a.offset() == b.offset());
  }
}

TEST_CASE("randn on CUDA matches the CPU within 1e-6") {
  MINIDL_REQUIRE_CUDA();
  Generator a(6), b(6);
  Tensor cpu = ops::randn({100003}, {}, &a);
  Tensor gpu = ops::randn({100003}, {DType::Float32, Device::cuda()}, &b);
  // logf/sinf/cosf differ by an ulp or two between libm and CUDA; |x| < 6 here.
  check_close(gpu, cpu, 1e-6, 1e-6);
  Generator c(6), d(6);
  check_close(ops::randn({4097}, {DType::BFloat16, Device::cuda()}, &d),
              ops::randn({4097}, {DType::BFloat16}, &c), 0, 1e-2);  // one bf16 rounding step
}
