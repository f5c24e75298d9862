// softmax, log_softmax, cross_entropy and layer_norm: hand-computed values,
// float64 gradchecks (non-contiguous inputs included), error messages, and
// CPU-vs-CUDA parity of outputs and gradients over every kernel path
// (warp per row, scalar or 16-byte accesses; block per row).
#include <cmath>
#include <limits>

#include "cpu/nn_functional.h"
#include "cuda/nn_functional.h"
#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

TensorOptions f64_grad() { return {DType::Float64, Device::cpu(), true}; }
std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

void check_values(const Tensor& t, const std::vector<double>& expected, double eps = 1e-7) {
  std::vector<double> v = values(t);
  REQUIRE(v.size() == expected.size());
  for (size_t i = 0; i < v.size(); ++i) {
    CAPTURE(i);
    CHECK(v[i] == doctest::Approx(expected[i]).epsilon(eps));
  }
}

// Targets in [0, classes) with every fifth row ignored (-100).
Tensor make_targets(int64_t rows, int64_t classes, Device device = Device::cpu()) {
  std::vector<int32_t> t(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i)
    t[static_cast<size_t>(i)] = i % 5 == 3 ? -100 : static_cast<int32_t>((i * 7919 + 13) % classes);
  return from_vector(t, {rows}, {DType::Int32, device, false});
}

// A random affine parameter around `center`.
Tensor param(int64_t n, DType dtype, double center, bool grad) {
  Tensor p = ops::add(ops::mul(random_tensor({n}, {dtype}), 0.5), center);
  if (grad) p.requires_grad_(true);
  return p;
}

}  // namespace

TEST_CASE("softmax and log_softmax: exact values, rows, large inputs") {
  Tensor x = from_vector(std::vector<double>{1, 2, 3, 0, 0, 0}, {2, 3});
  check_values(ops::softmax(x), {0.0900305731703805, 0.2447284710547977, 0.6652409557748219, 1. / 3, 1. / 3, 1. / 3});
  check_values(ops::log_softmax(x), {-2.4076059644443806, -1.4076059644443806, -0.4076059644443806,
                                     -std::log(3.0), -std::log(3.0), -std::log(3.0)});
  // Stable for large logits (exp(1001) overflows without the max shift).
  Tensor big = from_vector(std::vector<float>{1001, 1002, 1003}, {3});
  check_values(ops::softmax(big), {0.0900305731703805, 0.2447284710547977, 0.6652409557748219}, 1e-5);
  check_values(ops::log_softmax(big), {-2.4076059644443806, -1.4076059644443806, -0.4076059644443806}, 1e-5);
  Tensor b16 = ops::softmax(from_vector(std::vector<float>{1, 2, 3}, {3}).to(DType::BFloat16));
  CHECK(b16.dtype() == DType::BFloat16);
  check_values(b16, {0.0900305731703805, 0.2447284710547977, 0.6652409557748219}, 1e-2);
}

TEST_CASE("softmax and log_softmax gradcheck: 2-D, 3-D, non-contiguous") {
  Tensor x = random_tensor({3, 5}, f64_grad());
  Tensor t = random_tensor({5, 3}, f64_grad());
  Tensor z = random_tensor({2, 3, 4}, f64_grad());
  for (bool log : {false, true}) {
    CAPTURE(log);
    auto f = [log](const Tensor& v) { return log ? ops::log_softmax(v) : ops::softmax(v); };
    CHECK(gradcheck([&](const std::vector<Tensor>& v) { return f(v[0]); }, {x}));
    CHECK(gradcheck([&](const std::vector<Tensor>& v) { return f(v[0].transpose(0, 1)); }, {t}));
    CHECK(gradcheck([&](const std::vector<Tensor>& v) { return f(v[0].permute({2, 0, 1})); }, {z}));
  }
  // A broadcast (stride-0) upstream gradient: d/dx sum(softmax(x)) = 0.
  Tensor w = random_tensor({4, 6}, f64_grad());
  ops::sum(ops::softmax(w)).backward();
  for (double g : values(w.grad())) CHECK(std::abs(g) < 1e-12);
}

TEST_CASE("cross_entropy by hand, with an ignored target") {
  Tensor logits = from_vector(std::vector<double>{1, 2, 3, 1, 1, 1, 0, 0, 5}, {3, 3});
  logits.requires_grad_(true);
  Tensor targets = from_vector(std::vector<int32_t>{2, -100, 0}, {3});
  Tensor loss = ops::cross_entropy(logits, targets);
  CHECK(loss.shape() == Shape{});
  double e5 = std::exp(-5.0);
  double row0 = 0.4076059644443806;           // log(e^-2 + e^-1 + 1)
  double row2 = 5 + std::log(1 + 2 * e5);     // lse([0, 0, 5]) - 0
  CHECK(loss.item<double>() == doctest::Approx((row0 + row2) / 2).epsilon(1e-12));
  loss.backward();
  double p2 = e5 / (1 + 2 * e5), q2 = 1 / (1 + 2 * e5);
  check_values(logits.grad(), {0.0900305731703805 / 2, 0.2447284710547977 / 2, (0.6652409557748219 - 1) / 2,
                               0, 0, 0, (p2 - 1) / 2, p2 / 2, q2 / 2},
               1e-10);
  // The default ignore_index is -100; another one skips its rows instead.
  Tensor t2 = from_vector(std::vector<int32_t>{2, 1, 1}, {3});
  CHECK(ops::cross_entropy(logits, t2, 1).item<double>() == doctest::Approx(row0).epsilon(1e-12));
}

TEST_CASE("cross_entropy: every target ignored gives 0, not NaN") {
  Tensor logits = random_tensor({2, 4}, f64_grad());
  Tensor loss = ops::cross_entropy(logits, from_vector(std::vector<int32_t>{-100, -100}, {2}));
  CHECK(loss.item<double>() == 0);
  loss.backward();
  for (double g : values(logits.grad())) CHECK(g == 0);
  CHECK(ops::cross_entropy(ops::zeros({0, 3}), from_vector(std::vector<int32_t>{}, {0})).item<float>() == 0);
}

TEST_CASE("cross_entropy equals the mean of -log_softmax at the targets") {
  int64_t n = 40, c = 7;
  Tensor logits = ops::mul(random_tensor({n, c}, {DType::Float32}), 4.0);
  Tensor targets = make_targets(n, c);
  std::vector<double> ls = values(ops::log_softmax(logits));
  std::vector<int32_t> t = targets.to_vector<int32_t>();
  double sum = 0;
  int count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (t[static_cast<size_t>(i)] == -100) continue;
    sum -= ls[static_cast<size_t>(i * c + t[static_cast<size_t>(i)])];
    ++count;
  }
  CHECK(ops::cross_entropy(logits, targets).item<double>() == doctest::Approx(sum / count).epsilon(1e-5));
}

TEST_CASE("cross_entropy gradcheck: ignored rows, custom ignore_index, non-contiguous logits") {
  Tensor x = random_tensor({4, 5}, f64_grad());
  Tensor xt = random_tensor({5, 4}, f64_grad());
  Tensor t = from_vector(std::vector<int32_t>{1, -100, 4, 0}, {4});
  Tensor t2 = from_vector(std::vector<int32_t>{2, 0, 2, 1}, {4});
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ops::cross_entropy(v[0], t); }, {x}));
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ops::cross_entropy(v[0], t2, 2); }, {x}));
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ops::cross_entropy(v[0].transpose(0, 1), t); }, {xt}));
  // Composed with other ops (the gradient seed is not 1).
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ops::mul(ops::cross_entropy(ops::tanh(v[0]), t), 3.0); },
                  {x}));
}

TEST_CASE("cross_entropy errors") {
  Tensor logits = random_tensor({3, 4});
  Tensor t = from_vector(std::vector<int32_t>{0, 1, 2}, {3});
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, t.to(DType::Float64)),
                       doctest::Contains("cross_entropy: targets must be int32 class indices, got float64 [3]"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, from_vector(std::vector<int32_t>{0, 1}, {2})),
                       doctest::Contains("cross_entropy: targets must have shape [3]"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, t.view({3, 1})),
                       doctest::Contains("targets must have shape [3] to match logits float64 [3, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits.view({12}), t),
                       doctest::Contains("cross_entropy: expected logits of shape (N, C)"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, from_vector(std::vector<int32_t>{0, 4, 1}, {3})),
                       doctest::Contains("cross_entropy: target 4 at row 1 is out of range for 4 classes"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, from_vector(std::vector<int32_t>{0, 1, -1}, {3})),
                       doctest::Contains("target -1 at row 2 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(ops::zeros({3, 4}, {DType::Int32}), t),
                       doctest::Contains("cross_entropy: expected a floating-point tensor"), Error);
}

TEST_CASE("layer_norm: a known row, with and without affine") {
  Tensor x = from_vector(std::vector<double>{1, 2, 3, 4, 5, 5, 5, 5}, {2, 4});
  double r = 1 / std::sqrt(1.25);
  // A constant row normalises to 0 (var 0, eps keeps rstd finite).
  check_values(ops::layer_norm(x, Tensor(), Tensor(), 0.0).slice(0, 0, 1), {-1.5 * r, -0.5 * r, 0.5 * r, 1.5 * r});
  check_values(ops::layer_norm(x, Tensor(), Tensor(), 1e-5).slice(0, 1, 2), {0, 0, 0, 0});
  Tensor w = from_vector(std::vector<double>{1, 2, 3, 4}, {4});
  Tensor b = from_vector(std::vector<double>{0.5, 0.5, 0.5, -1}, {4});
  check_values(ops::layer_norm(x, w, b, 0.0).slice(0, 0, 1), {-1.5 * r + 0.5, -1.0 * r + 0.5, 1.5 * r + 0.5, 6 * r - 1});
  check_values(ops::layer_norm(x, Tensor(), b, 0.0).slice(0, 0, 1), {-1.5 * r + 0.5, -0.5 * r + 0.5, 0.5 * r + 0.5, 1.5 * r - 1});
  check_values(ops::layer_norm(x.to(DType::Float32), w.to(DType::Float32), Tensor(), 0.0).slice(0, 0, 1),
               {-1.5 * r, -1.0 * r, 1.5 * r, 6 * r}, 1e-6);
  check_values(ops::layer_norm(x.to(DType::BFloat16), Tensor(), Tensor(), 0.0).slice(0, 0, 1),
               {-1.5 * r, -0.5 * r, 0.5 * r, 1.5 * r}, 1e-2);
}

TEST_CASE("layer_norm gradcheck: affine, weight only, bias only, none, non-contiguous") {
  Tensor x = random_tensor({3, 6}, f64_grad());
  Tensor xt = random_tensor({6, 2, 3}, f64_grad());
  Tensor w = param(6, DType::Float64, 1.0, true);
  Tensor b = param(6, DType::Float64, 0.0, true);
  auto ln = [](const Tensor& a, const Tensor& wt, const Tensor& bs) { return ops::layer_norm(a, wt, bs, 1e-5); };
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(v[0], v[1], v[2]); }, {x, w, b}));
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(v[0], v[1], Tensor()); }, {x, w}));
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(v[0], Tensor(), v[1]); }, {x, b}));
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(v[0], Tensor(), Tensor()); }, {x}));
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(v[0].permute({1, 2, 0}), v[1], v[2]); },
                  {xt, w, b}));
  // Parameters only (the input needs no gradient), and a non-contiguous weight.
  Tensor xc = random_tensor({4, 6});
  Tensor w2 = random_tensor({6, 2}, f64_grad());
  CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(xc, v[0].slice(1, 0, 1).squeeze(1), v[1]); }, {w2, b}));
}

TEST_CASE("layer_norm errors") {
  Tensor x = random_tensor({2, 4});
  Tensor w = random_tensor({4});
  CHECK_THROWS_WITH_AS(ops::layer_norm(x, random_tensor({3}), Tensor()),
                       doctest::Contains("layer_norm: weight must have shape [4] (the last dim of the input float64 "
                                         "[2, 4] on cpu), got float64 [3]"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::layer_norm(x, w, random_tensor({1, 4})),
                       doctest::Contains("layer_norm: bias must have shape [4]"), Error);
  CHECK_THROWS_WITH_AS(ops::layer_norm(x, w.to(DType::Float32), Tensor()),
                       doctest::Contains("layer_norm: dtype mismatch"), Error);
  CHECK_THROWS_WITH_AS(ops::layer_norm(from_vector(std::vector<double>{1}, {}), Tensor(), Tensor()),
                       doctest::Contains("layer_norm: expected a tensor with at least 1 dim"), Error);
  CHECK_THROWS_WITH_AS(ops::layer_norm(x, w, Tensor(), -1.0), doctest::Contains("layer_norm: eps must be >= 0"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::softmax(ops::zeros({3}, {DType::Int32})),
                       doctest::Contains("softmax: expected a floating-point tensor"), Error);
  CHECK_THROWS_WITH_AS(ops::log_softmax(Tensor()), doctest::Contains("log_softmax: input is an undefined tensor"),
                       Error);
}

// ---- CUDA ----

namespace {

struct Tol {
  double atol, rtol;
};

// Runs fn on CPU inputs and on CUDA copies of them (the same values), then
// backward from the same random seed; compares the outputs and the gradient
// of every input that requires grad.
template <typename Fn>
void check_parity(Fn fn, const std::vector<Tensor>& cpu_inputs, Tol out, Tol grad) {
  std::vector<Tensor> gpu_inputs;
  for (const Tensor& t : cpu_inputs) {
    Tensor g = t.defined() ? t.detach().to(Device::cuda()) : Tensor();
    if (t.defined() && t.requires_grad()) g.requires_grad_(true);
    gpu_inputs.push_back(g);
  }
  // The CPU inputs are shared between calls: start their gradients afresh.
  for (const Tensor& t : cpu_inputs)
    if (t.defined()) t.zero_grad();
  Tensor yc = fn(cpu_inputs), yg = fn(gpu_inputs);
  REQUIRE(yg.is_cuda());
  check_close(yg, yc, out.atol, out.rtol);
  Tensor seed = random_tensor(yc.shape(), {yc.dtype()});
  yc.backward(seed);
  yg.backward(seed.to(Device::cuda()));
  for (size_t i = 0; i < cpu_inputs.size(); ++i) {
    if (!cpu_inputs[i].defined() || !cpu_inputs[i].requires_grad()) continue;
    CAPTURE(i);
    check_close(gpu_inputs[i].grad(), cpu_inputs[i].grad(), grad.atol, grad.rtol);
  }
}

// Row lengths that reach every kernel path: warp per row with scalar access
// (65: the char-LM vocabulary; 250: eight accesses per lane), with 16-byte
// access (384: the char-LM width; 20), and block per row with 16-byte (3000)
// or scalar (1027) access.
const std::vector<Shape> kShapes = {{37, 65}, {33, 384}, {19, 250}, {2, 3, 20}, {5, 3000}, {7, 1027}, {1, 1}};

Tol tol(DType dtype, double f32_atol = 1e-5) {
  return dtype == DType::BFloat16 ? Tol{1e-2, 1e-2} : Tol{f32_atol, 1e-4};
}

}  // namespace

TEST_CASE("CUDA softmax / log_softmax parity") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Shape& shape : kShapes) {
      for (bool log : {false, true}) {
        CAPTURE(dtype);
        CAPTURE(shape_str(shape));
        CAPTURE(log);
        Tensor x = ops::mul(random_tensor(shape, {dtype}), 3.0);
        x.requires_grad_(true);
        auto f = [log](const std::vector<Tensor>& v) { return log ? ops::log_softmax(v[0]) : ops::softmax(v[0]); };
        check_parity(f, {x}, tol(dtype), tol(dtype));
      }
    }
  }
  // Non-contiguous input (made contiguous inside the op).
  Tensor t = random_tensor({65, 40}, {DType::Float32, Device::cpu(), true});
  check_parity([](const std::vector<Tensor>& v) { return ops::softmax(v[0].transpose(0, 1)); }, {t},
               tol(DType::Float32), tol(DType::Float32));
}

TEST_CASE("CUDA cross_entropy parity") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Shape& shape : kShapes) {
      if (shape.size() != 2) continue;
      CAPTURE(dtype);
      CAPTURE(shape_str(shape));
      Tensor logits = ops::mul(random_tensor(shape, {dtype}), 4.0);
      logits.requires_grad_(true);
      Tensor targets = make_targets(shape[0], shape[1]);
      // Gradients are (p - onehot) / count: tiny, so the absolute tolerance is too.
      double g_atol = (dtype == DType::BFloat16 ? 1e-3 : 1e-7) / static_cast<double>(shape[0]);
      check_parity([](const std::vector<Tensor>& v) { return ops::cross_entropy(v[0], v[1]); }, {logits, targets},
                   tol(dtype), {g_atol, dtype == DType::BFloat16 ? 1e-2 : 1e-4});
    }
  }
}

TEST_CASE("CUDA cross_entropy: all ignored gives 0; an out-of-range target gives NaN (not checked)") {
  MINIDL_REQUIRE_CUDA();
  Tensor logits = random_tensor({6, 65}, {DType::Float32, Device::cuda(), true});
  Tensor ignored = ops::full({6}, -100, {DType::Int32, Device::cuda()});
  Tensor loss = ops::cross_entropy(logits, ignored);
  CHECK(loss.item<float>() == 0);
  loss.backward();
  for (double g : values(logits.grad())) CHECK(g == 0);
  Tensor bad = from_vector(std::vector<int32_t>{0, 1, 65, 3, 4, 5}, {6}, {DType::Int32, Device::cuda(), false});
  CHECK(std::isnan(ops::cross_entropy(logits.detach(), bad).item<float>()));
}

TEST_CASE("CUDA layer_norm parity: affine, partial affine, long rows, many rows per warp") {
  MINIDL_REQUIRE_CUDA();
  std::vector<Shape> shapes = kShapes;
  shapes.push_back({4099, 384});  // several rows per warp in the fused parameter-gradient kernel
  shapes.push_back({300, 1500});  // long rows: column kernel with several row chunks
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Shape& shape : shapes) {
      int64_t c = shape.back();
      // One column: y = bias and dx is rounding noise times 1/sqrt(eps); nothing to compare.
      if (c == 1) continue;
      CAPTURE(dtype);
      CAPTURE(shape_str(shape));
      Tensor x = ops::add(ops::mul(random_tensor(shape, {dtype}), 2.0), 0.5);
      x.requires_grad_(true);
      Tensor w = param(c, dtype, 1.0, true), b = param(c, dtype, 0.0, true);
      // dweight/dbias sum over rows: their error grows like sqrt(rows).
      double rows = static_cast<double>(x.numel() / c);
      Tol g = dtype == DType::BFloat16 ? Tol{2e-2, 1e-2} : Tol{1e-5 * std::sqrt(rows), 1e-4};
      check_parity([](const std::vector<Tensor>& v) { return ops::layer_norm(v[0], v[1], v[2]); }, {x, w, b},
                   tol(dtype), g);
      check_parity([](const std::vector<Tensor>& v) { return ops::layer_norm(v[0], v[1], Tensor()); }, {x, w},
                   tol(dtype), g);
      check_parity([](const std::vector<Tensor>& v) { return ops::layer_norm(v[0], Tensor(), Tensor()); }, {x},
                   tol(dtype), g);
    }
  }
  // Parameters need grad, the input does not (dx is skipped).
  Tensor x = random_tensor({50, 384}, {DType::Float32});
  Tensor w = param(384, DType::Float32, 1.0, true), b = param(384, DType::Float32, 0.0, true);
  check_parity([](const std::vector<Tensor>& v) { return ops::layer_norm(v[0], v[1], v[2]); }, {x, w, b},
               tol(DType::Float32), tol(DType::Float32, 1e-4));
}

TEST_CASE("CUDA kernels on rows that are not 16-byte aligned") {
  MINIDL_REQUIRE_CUDA();
  // A contiguous (rows, 200) view at an offset of one element: the kernels
  // must fall back from 16-byte accesses.
  int64_t rows = 21, cols = 200;
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    Tensor base = random_tensor({1 + rows * cols}, {dtype});
    Tensor base_gpu = base.to(Device::cuda());
    auto view = [&](const Tensor& b) {
      Tensor v = b.slice(0, 1, 1 + rows * cols).view({rows, cols});
      v.requires_grad_(true);
      return v;
    };
    Tensor xc = view(base), xg = view(base_gpu);
    REQUIRE(xg.is_contiguous());
    Tensor seed = random_tensor({rows, cols}, {dtype});
    Tensor w = param(cols, dtype, 1.0, false);
    auto run = [&](const Tensor& x, const Tensor& s, const Tensor& wt) {
      Tensor y = ops::add(ops::softmax(x), ops::layer_norm(x, wt, Tensor()));
      y.backward(s);
      return y;
    };
    Tensor yc = run(xc, seed, w), yg = run(xg, seed.to(Device::cuda()), w.to(Device::cuda()));
    check_close(yg, yc, tol(dtype).atol, tol(dtype).rtol);
    check_close(xg.grad(), xc.grad(), tol(dtype).atol, tol(dtype).rtol);
  }
}

#if defined(MINIDL_WITH_CUDA)
TEST_CASE("CUDA layer_norm and cross_entropy finish their reductions in the last block: the same bits every call") {
  // The parameter gradients and the mean loss are completed by the last
  // block of the row kernel (counters in device memory that each launch
  // leaves at zero): calls of different grid sizes, one after another, must
  // each give the bits of a first call.
  MINIDL_REQUIRE_CUDA();
  Device gpu = Device::cuda();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    // rows: fewer blocks than the 32 groups of the partial sums, many more, a
    // partial last group; 384 columns take the warp kernel, 1500 the column one.
    for (const Shape& shape : {Shape{5, 384}, Shape{16384, 384}, Shape{4099, 384}, Shape{300, 1500}, Shape{37, 65}}) {
      CAPTURE(shape_str(shape));
      const int64_t rows = shape[0], cols = shape[1];
      Tensor x = random_tensor(shape, {dtype}).to(gpu), dy = random_tensor(shape, {dtype}).to(gpu);
      Tensor w = param(cols, dtype, 1.0, false).to(gpu);
      Tensor mean = ops::empty({rows}, {DType::Float32, gpu}), rstd = ops::empty({rows}, {DType::Float32, gpu});
      cuda::layer_norm_forward(x, w, Tensor(), rows, cols, 1e-5, ops::empty(shape, x.options()), mean, rstd);
      Tensor targets = make_targets(rows, cols, gpu);
      std::vector<double> first_dw, first_db, first_loss;
      for (int call = 0; call < 3; ++call) {
        CAPTURE(call);
        Tensor dx = ops::empty(shape, x.options()), dw = ops::full({cols}, std::nan(""), x.options()),
               db = ops::full({cols}, std::nan(""), x.options());
        cuda::layer_norm_backward(dy, x, w, mean, rstd, rows, cols, dx, dw, db);
        Tensor loss = ops::full({}, std::nan(""), x.options()), lse = ops::empty({rows}, {DType::Float32, gpu}),
               count = ops::empty({}, {DType::Float32, gpu});
        cuda::cross_entropy_forward(x, targets, rows, cols, -100, loss, lse, count);
        CHECK(count.item<double>() == static_cast<double>(rows - (rows + 1) / 5));  // make_targets ignores i % 5 == 3
        if (call == 0) {
          first_dw = values(dw), first_db = values(db), first_loss = values(loss);
          for (double v : first_dw) REQUIRE(std::isfinite(v));
          for (double v : first_db) REQUIRE(std::isfinite(v));
          REQUIRE(std::isfinite(first_loss[0]));
        } else {
          CHECK(values(dw) == first_dw);
          CHECK(values(db) == first_db);
          CHECK(values(loss) == first_loss);
        }
      }
    }
  }
}

TEST_CASE("CUDA nn_functional kernels write every output (poisoned buffers)") {
  MINIDL_REQUIRE_CUDA();
  Device gpu = Device::cuda();
  double nan = std::nan("");
  TensorOptions f32{DType::Float32}, f32g{DType::Float32, gpu};
  for (Shape shape : {Shape{37, 65}, Shape{13, 384}, Shape{5, 3000}}) {
    CAPTURE(shape_str(shape));
    int64_t rows = shape[0], cols = shape[1];
    Tensor x = random_tensor(shape, f32), dy = random_tensor(shape, f32);
    Tensor xg = x.to(gpu), dyg = dy.to(gpu);
    auto poisoned = [&](const Shape& s, bool on_gpu) { return ops::full(s, nan, on_gpu ? f32g : f32); };
    for (bool log : {false, true}) {
      Tensor yc = poisoned(shape, false), yg = poisoned(shape, true);
      cpu::softmax_forward(x, rows, cols, log, yc);
      cuda::softmax_forward(xg, rows, cols, log, yg);
      check_close(yg, yc, 1e-6, 1e-5);
      Tensor dc = poisoned(shape, false), dg = poisoned(shape, true);
      cpu::softmax_backward(yc, dy, rows, cols, log, dc);
      cuda::softmax_backward(yg, dyg, rows, cols, log, dg);
      check_close(dg, dc, 1e-6, 1e-4);
    }
    Tensor t = make_targets(rows, cols), tg = t.to(gpu);
    Tensor lc = poisoned({}, false), lg = poisoned({}, true);
    Tensor sc = poisoned({rows}, false), sg = poisoned({rows}, true);
    Tensor nc = poisoned({}, false), ng = poisoned({}, true);
    cpu::cross_entropy_forward(x, t, rows, cols, -100, lc, sc, nc);
    cuda::cross_entropy_forward(xg, tg, rows, cols, -100, lg, sg, ng);
    check_close(lg, lc, 1e-6, 1e-5);
    check_close(sg, sc, 1e-6, 1e-5);
    check_close(ng, nc, 1e-12, 0);
    Tensor g = from_vector(std::vector<float>{0.75f}, {});
    Tensor dc = poisoned(shape, false), dg = poisoned(shape, true);
    cpu::cross_entropy_backward(g, x, t, sc, nc, rows, cols, -100, dc);
    cuda::cross_entropy_backward(g.to(gpu), xg, tg, sg, ng, rows, cols, -100, dg);
    check_close(dg, dc, 1e-8, 1e-4);
    Tensor w = param(cols, DType::Float32, 1.0, false), b = param(cols, DType::Float32, 0.0, false);
    Tensor yc = poisoned(shape, false), yg = poisoned(shape, true);
    Tensor mc = poisoned({rows}, false), mg = poisoned({rows}, true);
    Tensor rc = poisoned({rows}, false), rg = poisoned({rows}, true);
    cpu::layer_norm_forward(x, w, b, rows, cols, 1e-5, yc, mc, rc);
    cuda::layer_norm_forward(xg, w.to(gpu), b.to(gpu), rows, cols, 1e-5, yg, mg, rg);
    check_close(yg, yc, 1e-5, 1e-4);
    check_close(mg, mc, 1e-6, 1e-5);
    check_close(rg, rc, 1e-6, 1e-5);
    Tensor dxc = poisoned(shape, false), dxg = poisoned(shape, true);
    Tensor dwc = poisoned({cols}, false), dwg = poisoned({cols}, true);
    Tensor dbc = poisoned({cols}, false), dbg = poisoned({cols}, true);
    cpu::layer_norm_backward(dy, x, w, mc, rc, rows, cols, dxc, dwc, dbc);
    cuda::layer_norm_backward(dyg, xg, w.to(gpu), mg, rg, rows, cols, dxg, dwg, dbg);
    check_close(dxg, dxc, 1e-5, 1e-4);
    check_close(dwg, dwc, 1e-5, 1e-4);
    check_close(dbg, dbc, 1e-5, 1e-4);
  }
}
#endif
