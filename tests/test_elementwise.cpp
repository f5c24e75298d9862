// Elementwise ops: exact values, float64 gradchecks (broadcasting,
// non-contiguous inputs), where/masked_fill, comparisons, in-place ops and
// the version counter, errors, and CPU-vs-CUDA parity.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64Grad{DType::Float64, Device::cpu(), true};

Tensor f64(const std::vector<double>& v, const Shape& shape) { return from_vector(v, shape); }
Tensor f64(const std::vector<double>& v) { return f64(v, {static_cast<int64_t>(v.size())}); }
std::vector<double> vals(const Tensor& t) { return t.to_vector<double>(); }

// Leaves for gradchecks: values in [-1, 1), or in [0.5, 1.5) for log, sqrt
// and fractional powers; optionally laid out transposed (non-contiguous).
Tensor leaf(const Shape& shape, bool positive = false, bool transposed = false) {
  Shape storage_shape = shape;
  if (transposed) std::swap(storage_shape[0], storage_shape[1]);
  Tensor t = random_tensor(storage_shape);
  if (positive) t = ops::add(ops::mul(t, 0.5), 1.0);
  if (transposed) t = t.transpose(0, 1);
  t.requires_grad_(true);
  return t;
}

using UnaryFn = std::function<Tensor(const Tensor&)>;
struct UnaryCase {
  const char* name;
  UnaryFn fn;
  double (*reference)(double);
  bool positive_domain;
};

double gelu_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

const std::vector<UnaryCase>& unary_cases() {
  static const std::vector<UnaryCase> cases = {
      {"neg", [](const Tensor& x) { return ops::neg(x); }, [](double x) { return -x; }, false},
      {"exp", [](const Tensor& x) { return ops::exp(x); }, [](double x) { return std::exp(x); }, false},
      {"log", [](const Tensor& x) { return ops::log(x); }, [](double x) { return std::log(x); }, true},
      {"tanh", [](const Tensor& x) { return ops::tanh(x); }, [](double x) { return std::tanh(x); }, false},
      {"sqrt", [](const Tensor& x) { return ops::sqrt(x); }, [](double x) { return std::sqrt(x); }, true},
      {"relu", [](const Tensor& x) { return ops::relu(x); }, [](double x) { return x > 0 ? x : 0.0; }, false},
      {"gelu", [](const Tensor& x) { return ops::gelu(x); }, gelu_ref, false},
      {"sigmoid", [](const Tensor& x) { return ops::sigmoid(x); },
       [](double x) { return 1.0 / (1.0 + std::exp(-x)); }, false},
      {"add scalar", [](const Tensor& x) { return ops::add(x, 0.75); }, [](double x) { return x + 0.75; }, false},
      {"mul scalar", [](const Tensor& x) { return ops::mul(x, -1.5); }, [](double x) { return x * -1.5; }, false},
      {"pow 3", [](const Tensor& x) { return ops::pow(x, 3.0); }, [](double x) { return x * x * x; }, false},
      {"pow 2.5", [](const Tensor& x) { return ops::pow(x, 2.5); }, [](double x) { return std::pow(x, 2.5); },
       true},
      {"pow -1.5", [](const Tensor& x) { return ops::pow(x, -1.5); },
       [](double x) { return std::pow(x, -1.5); }, true},
  };
  return cases;
}

using BinaryFn = std::function<Tensor(const Tensor&, const Tensor&)>;
struct BinaryCase {
  const char* name;
  BinaryFn fn;
  double (*reference)(double, double);
};

const std::vector<BinaryCase>& binary_cases() {
  static const std::vector<BinaryCase> cases = {
      {"add", [](const Tensor& a, const Tensor& b) { return ops::add(a, b); },
       [](double a, double b) { return a + b; }},
      {"sub", [](const Tensor& a, const Tensor& b) { return ops::sub(a, b); },
       [](double a, double b) { return a - b; }},
      {"mul", [](const Tensor& a, const Tensor& b) { return ops::mul(a, b); },
       [](double a, double b) { return a * b; }},
      {"div", [](const Tensor& a, const Tensor& b) { return ops::div(a, b); },
       [](double a, double b) { return a / b; }},
  };
  return cases;
}

}  // namespace

// ------------------------------------------------------------ exact values

TEST_CASE("unary ops on hand-computed values") {
  CHECK(vals(ops::neg(f64({1, -2, 0}))) == std::vector<double>{-1, 2, 0});
  CHECK(vals(ops::exp(f64({0}))) == std::vector<double>{1});
  CHECK(vals(ops::log(f64({1}))) == std::vector<double>{0});
  CHECK(vals(ops::sqrt(f64({4, 9, 0.25}))) == std::vector<double>{2, 3, 0.5});
  CHECK(vals(ops::relu(f64({-1, 0, 2.5}))) == std::vector<double>{0, 0, 2.5});
  CHECK(vals(ops::tanh(f64({0}))) == std::vector<double>{0});
  CHECK(vals(ops::sigmoid(f64({0}))) == std::vector<double>{0.5});
  CHECK(vals(ops::add(f64({1, -2}), 0.5)) == std::vector<double>{1.5, -1.5});
  CHECK(vals(ops::mul(f64({1, -2}), -3.0)) == std::vector<double>{-3, 6});
  CHECK(vals(ops::pow(f64({2, -3, 4}), 2.0)) == std::vector<double>{4, 9, 16});
  CHECK(vals(ops::pow(f64({4, 0.25}), -0.5)) == std::vector<double>{0.5, 2});
  {
    // x^0 is constant: its gradient is 0 at x = 0 too (not 0 * 0^-1).
    Tensor x = from_vector(std::vector<double>{0.0, 2.0}, {2}, {DType::Float64, Device::cpu(), true});
    ops::sum(ops::pow(x, 0.0)).backward();
    CHECK(vals(x.grad()) == std::vector<double>{0, 0});
  }
  std::vector<double> g = vals(ops::gelu(f64({0, 1, -1, 3})));
  CHECK(g[0] == 0.0);
  CHECK(g[1] == doctest::Approx(0.8411919906082768).epsilon(1e-12));
  CHECK(g[2] == doctest::Approx(-0.15880800939172324).epsilon(1e-12));
  CHECK(g[3] == doctest::Approx(2.99636259).epsilon(1e-8));
  // float32 and bfloat16 run the same math in float.
  CHECK(ops::exp(from_vector(std::vector<float>{1.0f}, {1})).item<float>() == std::exp(1.0f));
  CHECK(ops::mul(ops::ones({2}, {DType::BFloat16}), 3.0).to_vector<float>() == std::vector<float>{3, 3});
}

TEST_CASE("float32 tanh and gelu on the CPU: within a few ulp of float64, special values kept") {
  // The CPU evaluates float tanh with its own vectorisable formula
  // (core/scalar_math.h); float64 and CUDA use the library's.
  std::vector<float> xs;
  for (int i = -200000; i <= 200000; ++i) xs.push_back(static_cast<float>(i) * 1e-4f);  // [-20, 20]
  for (float x : {1e-30f, -1e-20f, 0.29999f, 0.3f, 0.30001f, 9.5f, -10.f, 87.f, -100.f}) xs.push_back(x);
  const int64_t n = static_cast<int64_t>(xs.size());
  Tensor x = from_vector(xs, {n});
  std::vector<float> t = ops::tanh(x).to_vector<float>(), g = ops::gelu(x).to_vector<float>();
  double worst_ulp = 0, worst_gelu = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float want = static_cast<float>(std::tanh(static_cast<double>(xs[i])));
    const double ulp = std::nextafter(std::fabs(want), 2.f) - std::fabs(want);
    worst_ulp = std::max(worst_ulp, std::fabs(static_cast<double>(t[i]) - want) / ulp);
    worst_gelu = std::max(worst_gelu, std::fabs(g[i] - gelu_ref(xs[i])) / (1 + std::fabs(gelu_ref(xs[i]))));
  }
  CHECK(worst_ulp <= 3.0);
  CHECK(worst_gelu <= 5e-7);
  std::vector<float> special =
      ops::tanh(from_vector(std::vector<float>{INFINITY, -INFINITY, -0.0f, NAN, 50.f}, {5})).to_vector<float>();
  CHECK(special[0] == 1.0f);
  CHECK(special[1] == -1.0f);
  CHECK((special[2] == 0.0f && std::signbit(special[2])));
  CHECK(std::isnan(special[3]));
  CHECK(special[4] == 1.0f);  // saturates exactly, so 1 - tanh^2 in the GELU gradient is 0
}

TEST_CASE("unary ops match the float64 reference on random inputs") {
  for (const UnaryCase& c : unary_cases()) {
    CAPTURE(std::string(c.name));
    Tensor x = random_tensor({7, 9});
    if (c.positive_domain) x = ops::add(ops::mul(x, 0.5), 1.0);
    std::vector<double> in = vals(x), out = vals(c.fn(x));
    for (size_t i = 0; i < in.size(); ++i) CHECK(out[i] == doctest::Approx(c.reference(in[i])).epsilon(1e-14));
    Tensor xt = x.transpose(0, 1);  // strided input, contiguous output
    Tensor yt = c.fn(xt);
    CHECK(yt.is_contiguous());
    check_close(yt, c.fn(xt.contiguous()), 0, 0);
  }
}

TEST_CASE("binary ops broadcast (NumPy rules)") {
  Tensor a = f64({1, 2}, {2, 1});
  Tensor b = f64({10, 20, 30}, {3});
  CHECK(ops::add(a, b).shape() == Shape{2, 3});
  CHECK(vals(ops::add(a, b)) == std::vector<double>{11, 21, 31, 12, 22, 32});
  CHECK(vals(ops::sub(a, b)) == std::vector<double>{-9, -19, -29, -8, -18, -28});
  CHECK(vals(ops::mul(a, b)) == std::vector<double>{10, 20, 30, 20, 40, 60});
  CHECK(vals(ops::div(b, a)) == std::vector<double>{10, 20, 30, 5, 10, 15});
  CHECK(ops::add(f64({1}, {}), f64({1, 2, 3, 4}, {2, 1, 2})).shape() == Shape{2, 1, 2});
  CHECK(ops::mul(ops::zeros({0, 3}, {DType::Float64}), b).shape() == Shape{0, 3});
  // Operators and scalar variants.
  Tensor x = f64({2, -4});
  CHECK(vals(x + x) == std::vector<double>{4, -8});
  CHECK(vals(x - 1.0) == std::vector<double>{1, -5});
  CHECK(vals(1.0 - x) == std::vector<double>{-1, 5});
  CHECK(vals(x + 1.0) == std::vector<double>{3, -3});
  CHECK(vals(1.0 + x) == std::vector<double>{3, -3});
  CHECK(vals(x * 0.5) == std::vector<double>{1, -2});
  CHECK(vals(0.5 * x) == std::vector<double>{1, -2});
  CHECK(vals(x / 4.0) == std::vector<double>{0.5, -1});
  CHECK(vals(-x) == std::vector<double>{-2, 4});
  CHECK(vals(x * x / x - x) == std::vector<double>{0, 0});
  for (const BinaryCase& c : binary_cases()) {
    CAPTURE(std::string(c.name));
    Tensor p = random_tensor({4, 1, 3}), q = random_tensor({5, 1});
    std::vector<double> pv = vals(p.expand({4, 5, 3})), qv = vals(q.expand({4, 5, 3}));
    std::vector<double> out = vals(c.fn(p, q));
    for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == c.reference(pv[i], qv[i]));
  }
}

TEST_CASE("comparisons give 1 or 0 in the input dtype and are not differentiable") {
  Tensor a = f64({1, 2, 3});
  Tensor b = f64({2}, {1});
  CHECK(vals(ops::gt(a, b)) == std::vector<double>{0, 0, 1});
  CHECK(vals(ops::lt(a, b)) == std::vector<double>{1, 0, 0});
  CHECK(vals(ops::eq(a, b)) == std::vector<double>{0, 1, 0});
  Tensor x = random_tensor({2, 3}, {DType::Float32, Device::cpu(), true});
  Tensor m = ops::gt(x, ops::zeros({3}));
  CHECK(m.dtype() == DType::Float32);
  CHECK_FALSE(m.requires_grad());
  CHECK(ops::lt(f64({1, 5}, {2, 1}), f64({2, 3, 4})).shape() == Shape{2, 3});
  Tensor bf = ops::eq(ops::ones({2}, {DType::BFloat16}), ops::full({1}, 1.0, {DType::BFloat16}));
  CHECK(bf.to_vector<float>() == std::vector<float>{1, 1});
}

TEST_CASE("where and masked_fill") {
  Tensor cond = from_vector(std::vector<int32_t>{1, 0, -3}, {3});
  Tensor a = f64({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor b = f64({-1}, {1});
  CHECK(vals(ops::where(cond, a, b)) == std::vector<double>{1, -1, 3, 4, -1, 6});
  Tensor fcond = f64({0, 1}, {2, 1});  // a float condition, broadcast over columns
  CHECK(vals(ops::where(fcond, a, b)) == std::vector<double>{-1, -1, -1, 4, 5, 6});
  Tensor bcond = from_vector(std::vector<float>{0.5f, 0}, {2, 1}, {DType::BFloat16});
  CHECK(vals(ops::where(bcond, a, b)) == std::vector<double>{1, 2, 3, -1, -1, -1});
  CHECK(vals(ops::masked_fill(a, cond, -7.0)) == std::vector<double>{-7, 2, -7, -7, 5, -7});
  // Gradients: each branch gets the upstream gradient where it was chosen.
  Tensor ga = ops::zeros({2, 3}, kF64Grad), gb = ops::zeros({1}, kF64Grad);
  ops::where(cond, ga, gb).backward(f64({1, 2, 3, 4, 5, 6}, {2, 3}));
  CHECK(vals(ga.grad()) == std::vector<double>{1, 0, 3, 4, 0, 6});
  CHECK(vals(gb.grad()) == std::vector<double>{2 + 5});
  Tensor gx = ops::zeros({2, 3}, kF64Grad);
  ops::sum(ops::mul(ops::masked_fill(gx, cond, 9.0), 2.0)).backward();
  CHECK(vals(gx.grad()) == std::vector<double>{0, 2, 0, 0, 2, 0});
  CHECK_THROWS_WITH_AS(ops::where(cond, a, ops::zeros({3})), doctest::Contains("where: dtype mismatch"), Error);
  CHECK_THROWS_WITH_AS(ops::where(f64({1, 0}), a, b), doctest::Contains("where: shapes [2] and [2, 3] are not broadcastable"),
                       Error);
}

// --------------------------------------------------------------- gradients

TEST_CASE("gradcheck: every unary op, contiguous and non-contiguous") {
  for (const UnaryCase& c : unary_cases()) {
    for (bool transposed : {false, true}) {
      CAPTURE(std::string(c.name));
      CAPTURE(transposed);
      Tensor x = leaf({3, 4}, c.positive_domain, transposed);
      UnaryFn fn = c.fn;
      CHECK(gradcheck([fn](const std::vector<Tensor>& in) { return fn(in[0]); }, {x}));
    }
  }
}

TEST_CASE("gradcheck: binary ops with broadcasting and non-contiguous inputs") {
  struct Shapes {
    Shape a, b;
    bool a_transposed;
  };
  std::vector<Shapes> shapes = {{{3, 4}, {3, 4}, false}, {{3, 4}, {4}, true}, {{4, 1}, {4, 3}, false},
                                {{2, 3}, {}, true},      {{3, 1, 2}, {4, 1}, false}};
  for (const BinaryCase& c : binary_cases()) {
    for (const Shapes& s : shapes) {
      CAPTURE(std::string(c.name));
      CAPTURE(shape_str(s.a));
      CAPTURE(shape_str(s.b));
      Tensor a = leaf(s.a, false, s.a_transposed);
      // Divisors stay away from zero.
      Tensor b = leaf(s.b, std::string(c.name) == "div");
      BinaryFn fn = c.fn;
      CHECK(gradcheck([fn](const std::vector<Tensor>& in) { return fn(in[0], in[1]); }, {a, b}));
    }
  }
  // The same tensor on both sides.
  Tensor x = leaf({2, 3}, true);
  for (const BinaryCase& c : binary_cases()) {
    CAPTURE(std::string(c.name));
    BinaryFn fn = c.fn;
    CHECK(gradcheck([fn](const std::vector<Tensor>& in) { return fn(in[0], in[0]); }, {x}));
  }
}

TEST_CASE("gradcheck: where, masked_fill and compositions") {
  Tensor cond = ops::gt(random_tensor({3, 1}), ops::zeros({1}, {DType::Float64}));
  Tensor mask = from_vector(std::vector<int32_t>{0, 1, 1, 0}, {1, 4});
  Tensor a = leaf({3, 4}, false, true), b = leaf({4});
  CHECK(gradcheck([&](const std::vector<Tensor>& in) { return ops::where(cond, in[0], in[1]); }, {a, b}));
  CHECK(gradcheck([&](const std::vector<Tensor>& in) { return ops::masked_fill(in[0], mask, -2.0); }, {a}));
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) {
        Tensor h = ops::gelu(ops::add(ops::mul(in[0], in[1]), 0.1));
        return ops::div(ops::sigmoid(h), ops::add(ops::exp(in[1]), 1.0)) - ops::tanh(in[0]) * 0.5;
      },
      {a, b}));
}

// ---------------------------------------------------------------- in-place

TEST_CASE("in-place ops: values and version counter") {
  Tensor x = f64({1, 2, 3, 4}, {2, 2});
  uint64_t v0 = x.version();
  ops::add_(x, f64({10, 20}), 0.5);  // broadcast src, scaled
  CHECK(vals(x) == std::vector<double>{6, 12, 8, 14});
  ops::mul_(x, 0.5);
  CHECK(vals(x) == std::vector<double>{3, 6, 4, 7});
  ops::add_(x.transpose(0, 1), f64({1, 2, 3, 4}, {2, 2}));  // strided destination
  CHECK(vals(x) == std::vector<double>{4, 9, 6, 11});
  ops::copy_(x, from_vector(std::vector<float>{1.5f}, {1}));
  CHECK(vals(x) == std::vector<double>{1.5, 1.5, 1.5, 1.5});
  ops::fill_(x.slice(1, 1, 2), -1.0);
  CHECK(vals(x) == std::vector<double>{1.5, -1, 1.5, -1});
  ops::zero_(x);
  CHECK(vals(x) == std::vector<double>{0, 0, 0, 0});
  CHECK(x.version() == v0 + 6);
  Tensor y = ops::mul(x, 2.0);  // out-of-place ops leave the version alone
  CHECK(x.version() == v0 + 6);
  CHECK(y.version() == 0);
}

TEST_CASE("in-place ops: a source overlapping its destination is read as it was; expanded destinations refused") {
  // A shifted slice of the same tensor: each element gets its old neighbour.
  Tensor x = f64({0, 1, 2, 3});
  ops::copy_(x.slice(0, 1, 4), x.slice(0, 0, 3));
  CHECK(vals(x) == std::vector<double>{0, 0, 1, 2});
  Tensor y = f64({0, 1, 2, 3});
  ops::add_(y.slice(0, 0, 3), y.slice(0, 1, 4));
  CHECK(vals(y) == std::vector<double>{1, 3, 5, 3});
  Tensor z = f64({1, 2});
  ops::add_(z, z);  // the same view: element by element in step
  CHECK(vals(z) == std::vector<double>{2, 4});
  // One memory location at several elements of the destination.
  Tensor e = f64({0, 0});
  CHECK_THROWS_WITH_AS(ops::add_(ops::expand(e, {3, 2}), f64({1, 1, 1, 1, 1, 1}, {3, 2})),
                       doctest::Contains("add_: the destination"), Error);
  CHECK_THROWS_WITH_AS(ops::mul_(ops::expand(e, {3, 2}), 2.0), doctest::Contains("(dim 0 has stride 0"), Error);
  CHECK_THROWS_WITH_AS(ops::copy_(ops::expand(e, {3, 2}), f64({1, 2})), doctest::Contains("copy_: the destination"),
                       Error);
  ops::fill_(ops::expand(e, {3, 2}), 5.0);  // one value: no order to get wrong
  CHECK(vals(e) == std::vector<double>{5, 5});
  // A sliding window (as_strided): elements i and i + 1 of dim 0 share memory.
  Tensor w = f64({0, 0, 0, 0, 0});
  CHECK_THROWS_WITH_AS(ops::copy_(w.as_strided({4, 2}, {1, 1}, 0), ops::ones({4, 2}, {DType::Float64})),
                       doctest::Contains("may have several elements at one memory location"), Error);
  // Transposed, sliced and stepped views of a tensor of its own are fine.
  Tensor m = ops::zeros({4, 6}, {DType::Float64});
  ops::copy_(m.transpose(0, 1).slice(0, 1, 5), ops::ones({4, 4}, {DType::Float64}));
  ops::add_(m.as_strided({2, 3}, {12, 2}, 0), ops::ones({2, 3}, {DType::Float64}));
  CHECK(ops::sum(m).item<double>() == 16 + 6);
}

TEST_CASE("relu: NaN stays NaN and its gradient passes, as in PyTorch") {
  Tensor x = f64({std::numeric_limits<double>::quiet_NaN(), -1, 0, 2});
  x.requires_grad_(true);
  Tensor y = ops::relu(x);
  std::vector<double> v = vals(y);
  CHECK(std::isnan(v[0]));
  CHECK(v[1] == 0);
  CHECK(v[2] == 0);
  CHECK(v[3] == 2);
  ops::sum(y).backward();
  CHECK(vals(x.grad()) == std::vector<double>{1, 0, 0, 1});
}

TEST_CASE("in-place change of a saved tensor makes backward throw") {
  using Mutation = std::function<void(const Tensor&)>;
  std::vector<std::pair<const char*, Mutation>> mutations = {
      {"fill_", [](const Tensor& t) { ops::fill_(t, 1.0); }},
      {"zero_", [](const Tensor& t) { ops::zero_(t); }},
      {"copy_", [](const Tensor& t) { ops::copy_(t, ops::ones({}, {DType::Float64})); }},
      {"add_", [](const Tensor& t) { ops::add_(t, t); }},
      {"mul_", [](const Tensor& t) { ops::mul_(t, 2.0); }},
  };
  for (auto& [name, mutate] : mutations) {
    CAPTURE(std::string(name));
    Tensor x = leaf({4});
    Tensor w = random_tensor({2, 4});
    Tensor loss = ops::sum(ops::mul(x, w.slice(0, 1, 2)));  // saves a view of w
    mutate(w.slice(0, 0, 1));  // another view of the same storage
    CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("mul backward: a tensor of shape [1, 4] saved for "
                                                            "backward was modified in place"),
                         Error);
  }
  // Outputs saved by exp are protected the same way.
  Tensor x = leaf({3});
  Tensor y = ops::exp(x);
  Tensor loss = ops::sum(y);
  {
    NoGradGuard no_grad;
    ops::mul_(y, 2.0);
  }
  CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("exp backward"), Error);
}

TEST_CASE("in-place writes to tensors that require grad are refused outside NoGradGuard") {
  Tensor p = leaf({3});
  CHECK_THROWS_WITH_AS(ops::mul_(p, 2.0), doctest::Contains("mul_: in-place write to a tensor that requires "
                                                            "grad (float64 [3] on cpu); wrap it in NoGradGuard"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::add_(p, p), doctest::Contains("add_: in-place write"), Error);
  CHECK_THROWS_WITH_AS(ops::fill_(ops::exp(p), 0.0), doctest::Contains("fill_: in-place write"), Error);
  std::vector<double> before = vals(p);
  {
    NoGradGuard no_grad;  // how optimizers update parameters
    ops::add_(p, ops::ones({3}, {DType::Float64}), -0.5);
  }
  std::vector<double> after = vals(p);
  for (size_t i = 0; i < after.size(); ++i) CHECK(after[i] == before[i] - 0.5);
  autograd::clear_tape();
}

// ------------------------------------------------------------------ errors

TEST_CASE("elementwise errors name the op, dtypes, shapes and devices") {
  Tensor a = random_tensor({2}, {DType::Float32});
  Tensor b = random_tensor({2}, {DType::Float64});
  CHECK_THROWS_WITH_AS(ops::add(a, b), doctest::Contains("add: dtype mismatch (float32 [2] on cpu vs float64 [2] "
                                                         "on cpu); convert one with to(dtype)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::mul(a, random_tensor({3}, {DType::Float32})),
                       doctest::Contains("mul: shapes [2] and [3] are not broadcastable"), Error);
  Tensor i = ops::zeros({2}, {DType::Int32});
  CHECK_THROWS_WITH_AS(ops::exp(i), doctest::Contains("exp: expected a floating-point tensor, got int32 [2] on cpu"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::gt(i, i), doctest::Contains("gt: expected a floating-point tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::sub(Tensor(), a), doctest::Contains("sub: first input is an undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::div(a, Tensor()), doctest::Contains("div: second input is an undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::relu(Tensor()), doctest::Contains("relu: input is an undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::add_(a, b), doctest::Contains("add_: dtype mismatch"), Error);
  CHECK_THROWS_WITH_AS(ops::add_(a, random_tensor({3}, {DType::Float32})),
                       doctest::Contains("add_: shapes [3] and [2] are not broadcastable"), Error);
  CHECK_THROWS_WITH_AS(ops::copy_(ops::zeros({3}), ops::zeros({2, 3})),
                       doctest::Contains("copy_: the source's shape [2, 3] does not broadcast to the destination's [3]"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::add_(i, i, 2.0), doctest::Contains("add_: alpha 2 needs a floating-point tensor, got int32"),
                       Error);
}

// ------------------------------------------------------------------- CUDA

namespace {

double parity_tol(DType dtype) { return dtype == DType::Float32 ? 1e-5 : 1e-2; }

}  // namespace

TEST_CASE("unary ops: CUDA matches CPU (float32, bfloat16), forward and float32 backward") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const UnaryCase& c : unary_cases()) {
      CAPTURE(dtype);
      CAPTURE(std::string(c.name));
      Tensor x = random_tensor({33, 65}, {dtype});
      if (c.positive_domain) x = ops::add(ops::mul(x, 0.5), 1.0);
      Tensor xg = x.to(Device::cuda());
      double tol = parity_tol(dtype);
      check_close(c.fn(xg), c.fn(x), 1e-6, tol);
      check_close(c.fn(xg.transpose(0, 1)), c.fn(x.transpose(0, 1)), 1e-6, tol);  // strided
      if (dtype != DType::Float32) continue;
      Tensor lc = x.detach().requires_grad_(true), lg = xg.detach().requires_grad_(true);
      Tensor seed = random_tensor({33, 65}, {dtype});
      c.fn(lc).backward(seed);
      c.fn(lg).backward(seed.to(Device::cuda()));
      check_close(lg.grad(), lc.grad(), 1e-6, tol);
    }
  }
}

TEST_CASE("binary ops, comparisons and where: CUDA matches CPU (float32, bfloat16)") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    double tol = parity_tol(dtype);
    Tensor a = random_tensor({17, 1, 40}, {dtype});
    Tensor b_storage = ops::add(ops::mul(random_tensor({40, 9}, {dtype}), 0.5), 1.0);
    Tensor b = b_storage.transpose(0, 1);  // (9, 40), strided; away from zero for div
    Tensor ag = a.to(Device::cuda()), bg = b_storage.to(Device::cuda()).transpose(0, 1);
    REQUIRE_FALSE(bg.is_contiguous());
    for (const BinaryCase& c : binary_cases()) {
      CAPTURE(std::string(c.name));
      check_close(c.fn(ag, bg), c.fn(a, b), 1e-6, tol);
      check_close(c.fn(bg, ag), c.fn(b, a), 1e-6, tol);
    }
    check_close(ops::gt(ag, bg), ops::gt(a, b), 0, 0);
    check_close(ops::lt(ag, bg), ops::lt(a, b), 0, 0);
    check_close(ops::eq(ag, ag), ops::eq(a, a), 0, 0);
    Tensor cond = ops::gt(random_tensor({9, 1}, {DType::Float32}), ops::zeros({1}));
    check_close(ops::where(cond.to(Device::cuda()), ag, bg), ops::where(cond, a, b), 0, 0);
    check_close(ops::masked_fill(bg, cond.to(Device::cuda()), 3.0), ops::masked_fill(b, cond, 3.0), 0, 0);
  }
}

TEST_CASE("binary ops: CUDA backward matches CPU (float32)") {
  MINIDL_REQUIRE_CUDA();
  for (const BinaryCase& c : binary_cases()) {
    CAPTURE(std::string(c.name));
    Tensor a = random_tensor({6, 1, 8}, {DType::Float32, Device::cpu(), true});
    Tensor b = ops::add(ops::mul(random_tensor({5, 8}, {DType::Float32}), 0.5), 1.0).detach().requires_grad_(true);
    Tensor ag = a.detach().to(Device::cuda()).requires_grad_(true);
    Tensor bg = b.detach().to(Device::cuda()).requires_grad_(true);
    Tensor seed = random_tensor({6, 5, 8}, {DType::Float32});
    c.fn(a, b).backward(seed);
    c.fn(ag, bg).backward(seed.to(Device::cuda()));
    check_close(ag.grad(), a.grad(), 1e-5, 1e-5);
    check_close(bg.grad(), b.grad(), 1e-5, 1e-5);
  }
}

TEST_CASE("in-place ops on CUDA match CPU (float32, bfloat16)") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    Tensor x = random_tensor({8, 12}, {dtype});
    Tensor xg = x.to(Device::cuda());
    Tensor src = random_tensor({12}, {dtype});
    Tensor srcg = src.to(Device::cuda());
    auto mutate = [](const Tensor& t, const Tensor& s) {
      ops::add_(t.slice(1, 0, 12, 2), s.slice(0, 0, 12, 2), -0.5);
      ops::mul_(t.transpose(0, 1).narrow(1, 2, 3), 3.0);
      ops::fill_(t.slice(0, 7, 8), 0.25);
      ops::copy_(t.narrow(0, 0, 1), ops::full({12}, 2.0, {DType::Float64}));  // cast from float64
    };
    mutate(x, src);
    mutate(xg, srcg);
    check_close(xg, x, 0, 0);
  }
}

TEST_CASE("elementwise on CUDA: device mismatch is an error") {
  MINIDL_REQUIRE_CUDA();
  Tensor a = random_tensor({2}, {DType::Float32});
  Tensor g = random_tensor({2}, {DType::Float32, Device::cuda()});
  CHECK_THROWS_WITH_AS(ops::mul(g, a), doctest::Contains("mul: inputs are on different devices (float32 [2] on "
                                                         "cuda:0 vs float32 [2] on cpu)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::where(a, g, g), doctest::Contains("where: inputs are on different devices"), Error);
  CHECK_THROWS_WITH_AS(ops::add_(g, a), doctest::Contains("add_: inputs are on different devices"), Error);
}

// The CUDA fast paths (16-byte vectors over contiguous operands, row-vector /
// per-row-scalar / scalar broadcasts) against the CPU and against the CUDA
// strided path (an output that is not contiguous), on odd sizes, views that
// start off 16-byte alignment, and broadcast shapes.
namespace {

// Views of fresh random values of `shape` on the GPU whose first element sits
// `offset` elements into their storage (offset 1: misaligned for 16 bytes).
Tensor gpu_view(const Shape& shape, DType dtype, int64_t offset) {
  Tensor base = random_tensor({offset + numel(shape)}, {dtype}).to(Device::cuda());
  return base.narrow(0, offset, numel(shape)).view(shape);
}

// a + b through the CUDA strided kernels: written in place into every other
// element of a buffer (a non-contiguous output), then made contiguous.
Tensor add_via_strided(const Tensor& a, const Tensor& b) {
  Shape shape = broadcast_shapes(a.shape(), b.shape(), "test");
  Shape doubled = shape;
  doubled.push_back(2);
  Tensor out = ops::empty(doubled, a.options()).narrow(-1, 0, 1).squeeze(-1);
  REQUIRE_FALSE(out.is_contiguous());
  ops::copy_(out, a);
  ops::add_(out, b);
  return out.contiguous();
}

}  // namespace

TEST_CASE("CUDA elementwise fast paths match the CPU and the strided path") {
  MINIDL_REQUIRE_CUDA();
  struct Case {
    Shape a, b;
    int64_t a_offset, b_offset;
  };
  const std::vector<Case> cases{
      {{1000003}, {1000003}, 0, 0},   // contiguous, odd length: vectors + tail
      {{1000003}, {1000003}, 1, 0},   // misaligned: element by element
      {{7, 13}, {7, 13}, 0, 1},
      {{37, 24}, {24}, 0, 0},         // bias-like row vector, vectorised
      {{37, 24}, {24}, 0, 1},         // misaligned bias
      {{37, 65}, {65}, 0, 0},         // row length not a multiple of the vector
      {{3, 5, 40}, {40}, 0, 0},       // leading dims merged into rows
      {{24}, {37, 24}, 0, 0},         // broadcast first operand
      {{37, 24}, {37, 1}, 0, 0},      // per-row scalar
      {{2, 3, 16}, {2, 3, 1}, 1, 0},  // per-row scalar, misaligned matrix
      {{37, 24}, {}, 0, 0},           // one scalar
      {{4, 1, 6}, {1, 5, 6}, 0, 0},   // neither: the strided path
      {{9, 1}, {1, 7}, 0, 0},         // outer product: per-row scalar with a row
  };
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float64}) {
    for (const Case& c : cases) {
      CAPTURE(dtype);
      CAPTURE(shape_str(c.a));
      CAPTURE(shape_str(c.b));
      CAPTURE(c.a_offset);
      CAPTURE(c.b_offset);
      Tensor a = gpu_view(c.a, dtype, c.a_offset);
      Tensor b = gpu_view(c.b, dtype, c.b_offset);
      Tensor ac = a.to(Device::cpu()), bc = b.to(Device::cpu());
      check_close(ops::add(a, b), ops::add(ac, bc), 0, 0);
      check_close(ops::mul(a, b), ops::mul(ac, bc), 0, 0);
      check_close(ops::sub(b, a), ops::sub(bc, ac), 0, 0);
      check_close(ops::add(a, b), add_via_strided(a, b), 0, 0);
    }
  }
}

TEST_CASE("CUDA unary and in-place fast paths: odd sizes and misaligned views") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (int64_t offset : {0, 1, 3}) {
      CAPTURE(dtype);
      CAPTURE(offset);
      Tensor x = gpu_view({1001, 7}, dtype, offset);
      Tensor xc = x.to(Device::cpu());
      check_close(ops::mul(x, 1.5), ops::mul(xc, 1.5), 0, 0);
      check_close(ops::tanh(x), ops::tanh(xc), 1e-6, parity_tol(dtype));
      Tensor bias = gpu_view({7}, dtype, offset);
      ops::add_(x, bias);  // in place, row-broadcast source
      ops::add_(xc, bias.to(Device::cpu()));
      check_close(x, xc, 0, 0);
    }
  }
}

TEST_CASE("CUDA copies and casts: contiguous, misaligned, broadcast sources") {
  MINIDL_REQUIRE_CUDA();
  const std::vector<std::pair<DType, DType>> casts{
      {DType::Float32, DType::BFloat16}, {DType::BFloat16, DType::Float32},
      {DType::Float32, DType::Float64},  {DType::Float64, DType::BFloat16},
      {DType::Float32, DType::Float32},  {DType::BFloat16, DType::BFloat16}};
  for (auto [from, to] : casts) {
    for (int64_t offset : {0, 1}) {
      CAPTURE(from);
      CAPTURE(to);
      CAPTURE(offset);
      Tensor x = gpu_view({1000003}, from, offset);
      check_close(from == to ? ops::clone(x) : x.to(to), x.to(Device::cpu()).to(to), 0, 0);
      // Row-vector and per-row-scalar sources expanded into a contiguous output.
      Tensor row = gpu_view({40}, from, offset), col = gpu_view({33, 1}, from, offset);
      Tensor dst = ops::empty({33, 40}, {to, Device::cuda()});
      ops::copy_(dst, row);
      check_close(dst, row.to(Device::cpu()).to(to).expand({33, 40}), 0, 0);
      ops::copy_(dst, col);
      check_close(dst, col.to(Device::cpu()).to(to).expand({33, 40}), 0, 0);
      // A transposed source: the strided copy.
      Tensor m = gpu_view({40, 33}, from, offset).transpose(0, 1);
      ops::copy_(dst, m);
      check_close(dst, m.to(Device::cpu()).to(to), 0, 0);
    }
  }
  Tensor ints = from_vector(std::vector<int32_t>{1, -2, 3, 40000, -5}, {5});
  check_close(ints.to(Device::cuda()).to(DType::Float32), ints.to(DType::Float32), 0, 0);
}
