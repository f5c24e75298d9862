// matmul: NumPy shape rules, exact values, float64 gradchecks (broadcast,
// 1-D, transposed and irregular inputs), the CPU GEMM against a naive triple
// loop, CPU-vs-CUDA parity and error messages.
#include <cmath>
#include <limits>
#include <random>

#include "cpu/gemm.h"
#include "tests/helpers.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/matmul.h"
#endif

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

TensorOptions f64_leaf() { return {DType::Float64, Device::cpu(), true}; }

// Reference matmul in float64 with NumPy's rules, element by element.
Tensor reference_matmul(const Tensor& a_in, const Tensor& b_in) {
  Tensor a = a_in.dim() == 1 ? a_in.reshape({1, a_in.size(0)}) : a_in;
  Tensor b = b_in.dim() == 1 ? b_in.reshape({b_in.size(0), 1}) : b_in;
  int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  Shape batch = broadcast_shapes(Shape(a.shape().begin(), a.shape().end() - 2),
                                 Shape(b.shape().begin(), b.shape().end() - 2), "reference");
  Shape a_full = batch, b_full = batch;
  a_full.insert(a_full.end(), {m, k});
  b_full.insert(b_full.end(), {k, n});
  std::vector<double> av = a.expand(a_full).to_vector<double>();
  std::vector<double> bv = b.expand(b_full).to_vector<double>();
  int64_t nb = numel(batch);
  std::vector<double> cv(static_cast<size_t>(nb * m * n));
  for (int64_t t = 0; t < nb; ++t)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) s += av[(t * m + i) * k + p] * bv[(t * k + p) * n + j];
        cv[(t * m + i) * n + j] = s;
      }
  Shape out = batch;
  if (a_in.dim() > 1) out.push_back(m);
  if (b_in.dim() > 1) out.push_back(n);
  return from_vector(cv, out);
}

// max |actual - expected| <= tol * max |expected|: a tolerance relative to
// the result's scale, the natural one for reduced-precision GEMMs.
void check_scaled(const Tensor& actual, const Tensor& expected, double tol) {
  REQUIRE(actual.shape() == expected.shape());
  std::vector<double> x = actual.to_vector<double>(), y = expected.to_vector<double>();
  double scale = 0, worst = 0;
  for (double v : y) scale = std::max(scale, std::abs(v));
  size_t at = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double d = std::abs(x[i] - y[i]);
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  INFO("worst element ", at, ": ", x.empty() ? 0.0 : x[at], " vs ", y.empty() ? 0.0 : y[at],
       " (scale ", scale, ")");
  CHECK(worst <= tol * scale);
}

}  // namespace

// ---- exact values -------------------------------------------------------------

TEST_CASE("matmul exact small values, every dtype and 1-D rule") {
  for (DType dtype : {DType::Float32, DType::Float64, DType::BFloat16}) {
    CAPTURE(dtype);
    TensorOptions opt{dtype};
    Tensor a = from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3}, opt);
    Tensor b = from_vector(std::vector<double>{7, 8, 9, 10, 11, 12}, {3, 2}, opt);
    Tensor c = ops::matmul(a, b);
    CHECK(c.dtype() == dtype);
    CHECK(c.shape() == Shape{2, 2});
    CHECK(c.to_vector<double>() == std::vector<double>{58, 64, 139, 154});

    Tensor u = from_vector(std::vector<double>{1, 2, 3}, {3}, opt);
    Tensor v = from_vector(std::vector<double>{4, 5, 6}, {3}, opt);
    Tensor dot = ops::matmul(u, v);
    CHECK(dot.shape() == Shape{});
    CHECK(dot.item<double>() == 32);

    Tensor mv = ops::matmul(a, from_vector(std::vector<double>{1, 0, -1}, {3}, opt));
    CHECK(mv.shape() == Shape{2});
    CHECK(mv.to_vector<double>() == std::vector<double>{-2, -2});

    Tensor vm = ops::matmul(from_vector(std::vector<double>{1, -1}, {2}, opt), a);
    CHECK(vm.shape() == Shape{3});
    CHECK(vm.to_vector<double>() == std::vector<double>{-3, -3, -3});

    // A transposed view goes to the GEMM as a flag: aᵀ a.
    Tensor ata = ops::matmul(a.transpose(0, 1), a);
    CHECK(ata.to_vector<double>() ==
          std::vector<double>{17, 22, 27, 22, 29, 36, 27, 36, 45});
  }
}

TEST_CASE("matmul output shapes follow NumPy") {
  struct Case {
    Shape a, b, out;
  };
  for (const Case& c : std::vector<Case>{{{2, 1, 3, 4}, {5, 4, 2}, {2, 5, 3, 2}},
                                         {{4}, {3, 4, 2}, {3, 2}},
                                         {{2, 3, 4}, {4}, {2, 3}},
                                         {{3, 4}, {2, 4, 5}, {2, 3, 5}},
                                         {{1, 4}, {4, 1}, {1, 1}},
                                         {{2, 3, 0}, {0, 5}, {2, 3, 5}},
                                         {{0, 3}, {3, 5}, {0, 5}}}) {
    CAPTURE(shape_str(c.a));
    CAPTURE(shape_str(c.b));
    Tensor a = random_tensor(c.a), b = random_tensor(c.b);
    Tensor y = ops::matmul(a, b);
    CHECK(y.shape() == c.out);
    check_close(y, reference_matmul(a, b), 1e-12, 1e-12);
  }
}

TEST_CASE("matmul batch layouts: folded rows, strided and unmergeable batch dims") {
  Tensor w = random_tensor({4, 3});
  // Rows of a batch of row vectors are one (5, 4) matrix: a single GEMM.
  Tensor rows = random_tensor({5, 1, 4});
  check_close(ops::matmul(rows, w), reference_matmul(rows, w), 1e-12, 1e-12);
  // Every other matrix: the batch stride is not M * lda, so no folding.
  Tensor every_other = random_tensor({6, 2, 4}).slice(0, 0, 6, 2);
  check_close(ops::matmul(every_other, w), reference_matmul(every_other, w), 1e-12, 1e-12);
  // Permuted batch dims that do not merge into one.
  Tensor x = random_tensor({2, 3, 4, 5}).permute({1, 0, 2, 3});
  Tensor y = random_tensor({3, 2, 5, 2});
  check_close(ops::matmul(x, y), reference_matmul(x, y), 1e-12, 1e-12);
  check_close(ops::matmul(x, y.transpose(-1, -2).contiguous().transpose(-1, -2)),
              reference_matmul(x, y), 1e-12, 1e-12);
}

TEST_CASE("matmul reads transposed and broadcast layouts without copying") {
  Tensor a = random_tensor({48, 64}, {DType::Float32}), b = random_tensor({32, 48}, {DType::Float32});
  Tensor w = random_tensor({64, 32}, {DType::Float32});
  Tensor x = random_tensor({3, 5, 64}, {DType::Float32});
  Device cpu = Device::cpu();
  NoGradGuard no_grad;
  auto bytes_allocated_by = [&](auto&& f) {
    size_t before = memory_stats(cpu).allocated;
    reset_peak_memory_stats(cpu);
    Tensor y = f();
    return std::pair<size_t, Tensor>(memory_stats(cpu).peak_allocated - before, y);
  };
  // aᵀ (64, 48) @ bᵀ (48, 32): only the output is allocated.
  auto [tt_bytes, tt] = bytes_allocated_by([&] { return ops::matmul(a.transpose(0, 1), b.transpose(0, 1)); });
  CHECK(tt_bytes == 64 * 32 * sizeof(float));
  check_close(tt, reference_matmul(a.transpose(0, 1), b.transpose(0, 1)), 1e-4, 1e-4);
  // x (3, 5, 64) @ w (64, 32): the weight is broadcast, not materialised.
  auto [xw_bytes, xw] = bytes_allocated_by([&] { return ops::matmul(x, w); });
  CHECK(xw_bytes == 3 * 5 * 32 * sizeof(float));
  check_close(xw, reference_matmul(x, w), 1e-4, 1e-4);
  // A column slice with step 2 is irregular: it is copied (and still right).
  Tensor wide = random_tensor({48, 128}, {DType::Float32});
  auto [sl_bytes, sl] = bytes_allocated_by([&] { return ops::matmul(wide.slice(1, 0, 128, 2), w); });
  CHECK(sl_bytes > 48 * 32 * sizeof(float));
  check_close(sl, reference_matmul(wide.slice(1, 0, 128, 2), w), 1e-4, 1e-4);
}

// ---- gradients ------------------------------------------------------------------

TEST_CASE("matmul gradcheck: 2-D, batched and broadcast batch dims") {
  auto mm = [](const std::vector<Tensor>& x) { return ops::matmul(x[0], x[1]); };
  CHECK(gradcheck(mm, {random_tensor({3, 4}, f64_leaf()), random_tensor({4, 2}, f64_leaf())}));
  CHECK(gradcheck(mm, {random_tensor({2, 3, 4}, f64_leaf()), random_tensor({2, 4, 2}, f64_leaf())}));
  // Broadcast on both sides: (2, 1, 3, 4) @ (3, 4, 2) -> (2, 3, 3, 2).
  CHECK(gradcheck(mm, {random_tensor({2, 1, 3, 4}, f64_leaf()), random_tensor({3, 4, 2}, f64_leaf())}));
  // A shared weight on the right (batch folded into M; dW folds it into K).
  CHECK(gradcheck(mm, {random_tensor({2, 3, 4}, f64_leaf()), random_tensor({4, 5}, f64_leaf())}));
  CHECK(gradcheck(mm, {random_tensor({2, 3, 4}, f64_leaf()), random_tensor({1, 4, 5}, f64_leaf())}));
  // A shared matrix on the left.
  CHECK(gradcheck(mm, {random_tensor({3, 4}, f64_leaf()), random_tensor({2, 4, 5}, f64_leaf())}));
  // Only one input requires grad.
  CHECK(gradcheck(mm, {random_tensor({3, 4}, f64_leaf()), random_tensor({4, 2})}));
  CHECK(gradcheck(mm, {random_tensor({2, 3, 4}), random_tensor({4, 2}, f64_leaf())}));
}

TEST_CASE("matmul gradcheck: 1-D operands") {
  auto mm = [](const std::vector<Tensor>& x) { return ops::matmul(x[0], x[1]); };
  CHECK(gradcheck(mm, {random_tensor({4}, f64_leaf()), random_tensor({4}, f64_leaf())}));
  CHECK(gradcheck(mm, {random_tensor({3, 4}, f64_leaf()), random_tensor({4}, f64_leaf())}));
  CHECK(gradcheck(mm, {random_tensor({4}, f64_leaf()), random_tensor({4, 3}, f64_leaf())}));
  CHECK(gradcheck(mm, {random_tensor({4}, f64_leaf()), random_tensor({2, 4, 3}, f64_leaf())}));
  CHECK(gradcheck(mm, {random_tensor({2, 3, 4}, f64_leaf()), random_tensor({4}, f64_leaf())}));
}

TEST_CASE("matmul gradcheck: transposed, sliced and broadcast-row inputs") {
  Tensor a = random_tensor({4, 3}, f64_leaf()), b = random_tensor({2, 4}, f64_leaf());
  CHECK(gradcheck(
      [](const std::vector<Tensor>& x) {
        return ops::matmul(x[0].transpose(0, 1), x[1].transpose(0, 1));
      },
      {a, b}));
  Tensor c = random_tensor({2, 4, 3}, f64_leaf()), d = random_tensor({4, 5}, f64_leaf());
  CHECK(gradcheck(  // a batched transpose view on the left, shared weight on the right
      [](const std::vector<Tensor>& x) { return ops::matmul(x[0].transpose(-1, -2), x[1]); },
      {c, d}));
  Tensor e = random_tensor({3, 8}, f64_leaf()), f = random_tensor({4, 6}, f64_leaf());
  CHECK(gradcheck(  // every other column / row: irregular strides
      [](const std::vector<Tensor>& x) {
        return ops::matmul(x[0].slice(1, 0, 8, 2), x[1].slice(1, 1, 6, 2));
      },
      {e, f}));
  Tensor g = random_tensor({1, 4}, f64_leaf()), h = random_tensor({4, 2}, f64_leaf());
  CHECK(gradcheck(  // rows broadcast by expand (stride 0)
      [](const std::vector<Tensor>& x) { return ops::matmul(x[0].expand({3, 4}), x[1]); },
      {g, h}));
}

TEST_CASE("matmul gradcheck: one leaf on both sides (x xᵀ)") {
  Tensor x = random_tensor({3, 4}, f64_leaf());
  CHECK(gradcheck(
      [](const std::vector<Tensor>& v) { return ops::matmul(v[0], v[0].transpose(0, 1)); }, {x}));
}

TEST_CASE("matmul gradients have exact values on a small case") {
  Tensor a = from_vector(std::vector<double>{1, 2, 3, 4}, {2, 2}, f64_leaf());
  Tensor b = from_vector(std::vector<double>{5, 6, 7, 8}, {2, 2}, f64_leaf());
  ops::sum(ops::matmul(a, b)).backward();
  // d/dA sum(AB) = 1 Bᵀ: row sums of B; d/dB = Aᵀ 1: column sums of A.
  CHECK(a.grad().to_vector<double>() == std::vector<double>{11, 15, 11, 15});
  CHECK(b.grad().to_vector<double>() == std::vector<double>{4, 4, 6, 6});
}

// ---- the CPU GEMM against a naive triple loop -------------------------------------

namespace {

template <typename T>
void check_gemm_against_naive(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                              double beta, int64_t batch, bool broadcast_a, std::mt19937& rng) {
  CAPTURE(ta);
  CAPTURE(tb);
  CAPTURE(m);
  CAPTURE(n);
  CAPTURE(k);
  CAPTURE(beta);
  CAPTURE(batch);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  // Padded leading dims, so ld > row length is exercised too.
  int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, lda = a_cols + 3;
  int64_t b_rows = tb ? n : k, b_cols = tb ? k : n, ldb = b_cols + 1;
  int64_t ldc = n + 2;
  int64_t stride_a = broadcast_a ? 0 : a_rows * lda, stride_b = b_rows * ldb, stride_c = m * ldc;
  auto fill = [&](int64_t count) {
    std::vector<T> v(static_cast<size_t>(count));
    for (T& x : v) x = T(static_cast<compute_t<T>>(dist(rng)));
    return v;
  };
  std::vector<T> a = fill(std::max<int64_t>(a_rows * lda * (broadcast_a ? 1 : batch), 1));
  std::vector<T> b = fill(std::max<int64_t>(b_rows * ldb * batch, 1));
  std::vector<T> c = fill(std::max<int64_t>(m * ldc * batch, 1));
  if (beta == 0)  // beta == 0 must never read C
    for (T& x : c) x = T(std::numeric_limits<compute_t<T>>::quiet_NaN());
  std::vector<T> c0 = c;
  cpu::gemm_strided_batched<T>(ta, tb, m, n, k, compute_t<T>(alpha), a.data(), lda, stride_a,
                               b.data(), ldb, stride_b, compute_t<T>(beta), c.data(), ldc,
                               stride_c, batch);
  // Tolerance: float32 sums lose ~k ulps of sum |a_ip b_pj| at worst; bfloat16
  // additionally rounds the result once.
  double eps = std::is_same_v<T, double> ? 1e-15 : 1e-7;
  double round = std::is_same_v<T, BFloat16> ? 1.0 / 128 : 0.0;
  for (int64_t t = 0; t < batch; ++t) {
    const T* at = a.data() + t * stride_a;
    const T* bt = b.data() + t * stride_b;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0, mag = 0;
        for (int64_t p = 0; p < k; ++p) {
          double x = static_cast<double>(ta ? at[p * lda + i] : at[i * lda + p]);
          double y = static_cast<double>(tb ? bt[j * ldb + p] : bt[p * ldb + j]);
          s += x * y;
          mag += std::abs(x * y);
        }
        size_t ci = static_cast<size_t>(t * stride_c + i * ldc + j);
        double old = beta == 0 ? 0.0 : static_cast<double>(c0[ci]);
        double expect = alpha * s + beta * old;
        double got = static_cast<double>(c[ci]);
        double tol = 4 * eps * double(k + 2) * (std::abs(alpha) * mag + std::abs(beta * old)) +
                     round * std::abs(expect) + 1e-30;
        if (!(std::abs(got - expect) <= tol)) {
          INFO("C[", t, "][", i, "][", j, "] = ", got, ", expected ", expect);
          CHECK(std::abs(got - expect) <= tol);
          return;
        }
      }
    // Padding between rows of C is left alone.
    int64_t touched = 0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = n; j < ldc; ++j) {
        size_t ci = static_cast<size_t>(t * stride_c + i * ldc + j);
        bool same = std::isnan(static_cast<double>(c0[ci]))
                        ? std::isnan(static_cast<double>(c[ci]))
                        : static_cast<double>(c[ci]) == static_cast<double>(c0[ci]);
        touched += !same;
      }
    REQUIRE(touched == 0);
  }
}

}  // namespace

TEST_CASE("cpu gemm float32 matches a naive loop at awkward sizes") {
  std::mt19937 rng(7);
  const int64_t sizes[] = {1, 7, 33, 65, 257};
  int count = 0;
  for (int64_t m : sizes)
    for (int64_t n : sizes)
      for (int64_t k : sizes)
        for (int trans = 0; trans < 4; ++trans, ++count) {
          double beta = count % 3 == 0 ? 0.0 : count % 3 == 1 ? 1.0 : -0.5;
          double alpha = count % 2 ? 1.0 : 0.75;
          check_gemm_against_naive<float>(trans & 1, trans & 2, m, n, k, alpha, beta, 1, false, rng);
        }
}

TEST_CASE("cpu gemm: blocking edges, batches, broadcast A, k = 0") {
  std::mt19937 rng(11);
  // N beyond one NC panel, M beyond one MC block, K beyond one KC block.
  check_gemm_against_naive<float>(false, false, 7, 3100, 9, 1.0, 0.0, 1, false, rng);
  check_gemm_against_naive<float>(true, true, 300, 17, 600, 1.0, 0.5, 1, false, rng);
  // Batches: many small ones (a GEMM per thread) and a few large ones (a team per GEMM).
  check_gemm_against_naive<float>(false, true, 7, 33, 65, 1.0, 0.0, 9, false, rng);
  check_gemm_against_naive<float>(true, false, 65, 65, 65, 1.0, 1.0, 4, true, rng);
  check_gemm_against_naive<float>(false, false, 130, 70, 90, 2.0, 0.0, 3, false, rng);
  // k = 0: C = beta C.
  check_gemm_against_naive<float>(false, false, 5, 6, 0, 1.0, 0.5, 2, false, rng);
  check_gemm_against_naive<float>(false, false, 5, 6, 0, 1.0, 0.0, 1, false, rng);
}

TEST_CASE("cpu gemm float64 and bfloat16 match a naive loop") {
  std::mt19937 rng(13);
  for (int64_t s : {1, 7, 33, 65})
    for (int trans = 0; trans < 4; ++trans) {
      check_gemm_against_naive<double>(trans & 1, trans & 2, s, s + 2, 2 * s + 1, 1.0,
                                       trans == 3 ? 0.5 : 0.0, 2, trans == 1, rng);
      check_gemm_against_naive<BFloat16>(trans & 1, trans & 2, s + 1, s, 4 * s, 1.0,
                                         trans == 2 ? -1.0 : 0.0, 2, trans == 3, rng);
    }
  check_gemm_against_naive<double>(false, true, 200, 130, 300, 1.0, 0.0, 1, false, rng);
  check_gemm_against_naive<BFloat16>(true, false, 150, 70, 520, 1.0, 0.0, 1, false, rng);
}

TEST_CASE("cpu::matmul writes every output element (poisoned buffer)") {
  Tensor a = random_tensor({2, 3, 33, 17}, {DType::Float32});
  Tensor b = random_tensor({1, 17, 40}, {DType::Float32});
  Tensor out = ops::full({2, 3, 33, 40}, std::nan(""), {DType::Float32});
  cpu::matmul(a, false, 17, b.expand({2, 3, 17, 40}), false, 40, out);
  check_close(out, reference_matmul(a, b), 1e-5, 1e-5);
}

// ---- CPU vs CUDA ------------------------------------------------------------------

namespace {

// Forward and both gradients of sum(matmul(a, b) * w) on the CPU (float64
// reference from the same values) and on the GPU in `dtype`.
void check_cuda_parity(const Shape& sa, const Shape& sb, DType dtype, double tol, bool transpose_a) {
  CAPTURE(shape_str(sa));
  CAPTURE(shape_str(sb));
  CAPTURE(dtype);
  // Round the inputs to `dtype` first so both sides see the same values.
  Tensor a0 = random_tensor(sa, {dtype}).to(DType::Float64);
  Tensor b0 = random_tensor(sb, {dtype}).to(DType::Float64);
  Shape sy = reference_matmul(transpose_a ? a0.transpose(-1, -2) : a0, b0).shape();
  Tensor w0 = random_tensor(sy, {dtype}).to(DType::Float64);  // projection of the output
  auto run = [&](Device device, DType dt) {
    Tensor a = a0.to(dt).to(device).detach().requires_grad_(true);
    Tensor b = b0.to(dt).to(device).detach().requires_grad_(true);
    Tensor y = ops::matmul(transpose_a ? a.transpose(-1, -2) : a, b);
    ops::sum(ops::mul(y, w0.to(dt).to(device))).backward();
    return std::vector<Tensor>{y.to(Device::cpu()), a.grad().to(Device::cpu()),
                               b.grad().to(Device::cpu())};
  };
  std::vector<Tensor> ref = run(Device::cpu(), DType::Float64);
  std::vector<Tensor> gpu = run(Device::cuda(), dtype);
  for (size_t i = 0; i < 3; ++i) {
    CAPTURE(i);
    check_scaled(gpu[i], ref[i], tol);
  }
}

}  // namespace

TEST_CASE("matmul CUDA matches CPU: float32 (TF32), bfloat16, float64, forward and gradients") {
  MINIDL_REQUIRE_CUDA();
  struct Case {
    Shape a, b;
    bool transpose_a;
  };
  std::vector<Case> cases{{{64, 128}, {128, 96}, false},
                          {{3, 33, 257}, {257, 65}, false},      // shared weight, odd sizes
                          {{2, 1, 40, 512}, {3, 512, 24}, false},  // broadcast both ways, K = 512
                          {{5, 48}, {2, 48, 7}, false},            // shared left matrix
                          {{2, 64, 31}, {2, 64, 17}, true},        // transposed view
                          {{3, 2, 16, 24}, {1, 2, 24, 8}, false},  // batch dims that do not merge
                          {{300}, {300, 20}, false},               // 1-D
                          {{4, 9, 70}, {70}, false}};
  for (const Case& c : cases) {
    check_cuda_parity(c.a, c.b, DType::Float32, 1e-2, c.transpose_a);
    check_cuda_parity(c.a, c.b, DType::BFloat16, 2e-2, c.transpose_a);
    check_cuda_parity(c.a, c.b, DType::Float64, 1e-12, c.transpose_a);
  }
}

TEST_CASE("cuda::matmul writes every output element and handles unmerged batch dims") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  // b broadcast over the first of two batch dims only: two batch dims that do
  // not merge, so the launcher loops the outer one.
  Tensor a = random_tensor({3, 4, 20, 30}, {DType::Float32});
  Tensor b = random_tensor({1, 4, 30, 10}, {DType::Float32});
  Tensor out = ops::full({3, 4, 20, 10}, std::nan(""), {DType::Float32, Device::cuda()});
  Tensor bx = b.to(Device::cuda()).expand({3, 4, 30, 10});
  cuda::matmul(a.to(Device::cuda()), false, 30, bx, false, 10, out);
  check_scaled(out.to(Device::cpu()), reference_matmul(a, b), 1e-2);
  CHECK(ops::matmul(a.to(Device::cuda()), b.to(Device::cuda())).to(Device::cpu()).shape() ==
        Shape{3, 4, 20, 10});
#endif
}

// ---- errors -------------------------------------------------------------------------

TEST_CASE("matmul error messages") {
  Tensor a = random_tensor({2, 3}), b = random_tensor({4, 5});
  CHECK_THROWS_WITH_AS(ops::matmul(a, b),
                       doctest::Contains("matmul: inner dims differ: a is float64 [2, 3] on cpu, "
                                         "b is float64 [4, 5] on cpu; a's last dim (3) must "
                                         "equal b's second-to-last dim (4)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::matmul(a, random_tensor({4})),
                       doctest::Contains("b's only dim (4)"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(random_tensor({2, 2, 3}), random_tensor({3, 3, 4})),
                       doctest::Contains("matmul: batch dims [2] of a (float64 [2, 2, 3] on cpu) "
                                         "and [3] of b (float64 [3, 3, 4] on cpu) do not "
                                         "broadcast"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::matmul(a, random_tensor({3, 2}, {DType::Float32})),
                       doctest::Contains("matmul: dtype mismatch"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(ops::full({}, 2.0), random_tensor({3})),
                       doctest::Contains("matmul: operands need at least 1 dim"), Error);
  Tensor i = ops::zeros({2, 2}, {DType::Int32});
  CHECK_THROWS_WITH_AS(ops::matmul(i, i), doctest::Contains("matmul: expected a floating-point"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::matmul(Tensor(), a), doctest::Contains("matmul: first input is an undefined tensor"),
                       Error);
  if (cuda_is_available())
    CHECK_THROWS_WITH_AS(ops::matmul(a, random_tensor({3, 2}).to(Device::cuda())),
                         doctest::Contains("matmul: inputs are on different devices"), Error);
}
