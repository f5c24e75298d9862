// embedding, index_select, cat, stack, split: exact values, float64
// gradchecks (repeated indices, non-contiguous inputs), errors, and
// CPU-vs-CUDA parity.
#include "autograd/tape.h"
#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64Grad{DType::Float64, Device::cpu(), true};

Tensor int_tensor(const std::vector<int32_t>& values, const Shape& shape,
                  Device device = Device::cpu()) {
  return from_vector(values, shape, {DType::Int32, device, false});
}

// A float64 leaf whose storage is the transpose of `shape`: non-contiguous.
Tensor transposed_leaf(const Shape& shape) {
  Tensor t = random_tensor({shape[1], shape[0]}).transpose(0, 1);
  REQUIRE_FALSE(t.is_contiguous());
  t.requires_grad_(true);
  return t;
}

// Random int32 indices in [0, size), with repeats, built on the host.
Tensor random_indices(int64_t n, int64_t size, uint64_t seed, Device device = Device::cpu()) {
  Generator gen(seed);
  std::vector<float> u = ops::rand({n}, {}, &gen).to_vector<float>();
  std::vector<int32_t> idx(static_cast<size_t>(n));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(u[i] * static_cast<float>(size));
  return int_tensor(idx, {n}, device);
}

Tensor sum_sq(const Tensor& t) { return ops::sum(ops::mul(t, t)); }

}  // namespace

// ---------------------------------------------------------------- embedding

TEST_CASE("embedding gathers rows into (*indices.shape, C)") {
  Tensor weight = ops::arange(0, 12, 1, {DType::Float32}).reshape({4, 3});
  Tensor idx = int_tensor({3, 0, 1, 3}, {2, 2});
  Tensor out = ops::embedding(weight, idx);
  CHECK(out.shape() == Shape{2, 2, 3});
  CHECK(out.to_vector<float>() == std::vector<float>{9, 10, 11, 0, 1, 2, 3, 4, 5, 9, 10, 11});
  // Scalar indices give a single row.
  Tensor one = ops::embedding(weight, int_tensor({2}, {}));
  CHECK(one.shape() == Shape{3});
  CHECK(one.to_vector<float>() == std::vector<float>{6, 7, 8});
  // Non-contiguous weight and indices.
  Tensor wt = ops::arange(0, 12, 1, {DType::Float32}).reshape({3, 4}).transpose(0, 1);  // (4, 3)
  Tensor idx_t = int_tensor({1, 2, 0, 3}, {2, 2}).transpose(0, 1);                       // [[1,0],[2,3]]
  Tensor out_t = ops::embedding(wt, idx_t);
  CHECK(out_t.to_vector<float>() == std::vector<float>{1, 5, 9, 0, 4, 8, 2, 6, 10, 3, 7, 11});
}

TEST_CASE("embedding backward sums the gradient of repeated indices") {
  Tensor weight = ops::zeros({4, 2}, kF64Grad);
  Tensor idx = int_tensor({3, 0, 3, 3}, {4});
  Tensor seed = from_vector(std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8}, {4, 2});
  ops::embedding(weight, idx).backward(seed);
  // Row 3 gets rows 0, 2 and 3 of the seed; row 0 gets row 1; rows 1, 2 get nothing.
  CHECK(weight.grad().to_vector<double>() == std::vector<double>{3, 4, 0, 0, 0, 0, 1 + 5 + 7, 2 + 6 + 8});
}

TEST_CASE("embedding gradcheck") {
  Tensor idx = int_tensor({4, 1, 1, 0, 4, 2}, {2, 3});
  Tensor weight = random_tensor({5, 3}, kF64Grad);
  CHECK(gradcheck([&](const std::vector<Tensor>& x) { return ops::embedding(x[0], idx); }, {weight}));
  Tensor weight_t = transposed_leaf({5, 3});
  CHECK(gradcheck([&](const std::vector<Tensor>& x) { return ops::tanh(ops::embedding(x[0], idx)); },
                  {weight_t}));
}

TEST_CASE("embedding errors") {
  Tensor weight = random_tensor({4, 3});
  CHECK_THROWS_WITH_AS(ops::embedding(weight, int_tensor({0, 4}, {2})),
                       doctest::Contains("index 4 at position 1 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::embedding(weight, int_tensor({-1}, {1})),
                       doctest::Contains("index -1 at position 0 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::embedding(weight, random_tensor({2})),
                       doctest::Contains("embedding: indices must be int32"), Error);
  CHECK_THROWS_WITH_AS(ops::embedding(random_tensor({4}), int_tensor({0}, {1})),
                       doctest::Contains("embedding: weight must be 2-D"), Error);
  CHECK_THROWS_WITH_AS(ops::embedding(Tensor(), int_tensor({0}, {1})),
                       doctest::Contains("embedding: weight is an undefined tensor"), Error);
}

TEST_CASE("embedding CUDA matches CPU (float32, bfloat16)") {
  MINIDL_REQUIRE_CUDA();
  const int64_t vocab = 37, width = 48;
  Tensor idx = random_indices(2 * 300, vocab, 11).reshape({2, 300});  // many repeats
  Tensor idx_cuda = idx.to(Device::cuda());
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    Tensor w_cpu = random_tensor({vocab, width}, {dtype, Device::cpu(), true});
    Tensor w_cuda = w_cpu.detach().to(Device::cuda()).requires_grad_(true);
    Tensor seed = random_tensor({2, 300, width}, {dtype});
    Tensor out_cpu = ops::embedding(w_cpu, idx);
    Tensor out_cuda = ops::embedding(w_cuda, idx_cuda);
    check_close(out_cuda, out_cpu, 0, 0);  // a gather is exact
    out_cpu.backward(seed);
    out_cuda.backward(seed.to(Device::cuda()));
    REQUIRE(w_cuda.grad().dtype() == dtype);
    // fp32 atomics sum in another order; bfloat16 rounds the fp32 sum once.
    double tol = dtype == DType::Float32 ? 1e-5 : 1e-2;
    check_close(w_cuda.grad(), w_cpu.grad(), tol, tol);
  }
}

TEST_CASE("embedding CUDA: out-of-range indices read zeros and are skipped backward") {
  MINIDL_REQUIRE_CUDA();
  Tensor w = random_tensor({3, 2}, {DType::Float32, Device::cuda(), true});
  Tensor out = ops::embedding(w, int_tensor({1, 7, -2}, {3}, Device::cuda()));
  std::vector<float> v = out.to_vector<float>();
  std::vector<float> row1 = w.slice(0, 1, 2).to_vector<float>();
  CHECK(v == std::vector<float>{row1[0], row1[1], 0, 0, 0, 0});
  out.backward(ops::ones({3, 2}, {DType::Float32, Device::cuda()}));
  CHECK(w.grad().to_vector<float>() == std::vector<float>{0, 0, 1, 1, 0, 0});
}

TEST_CASE("embedding errors on CUDA: device mismatch") {
  MINIDL_REQUIRE_CUDA();
  Tensor w = random_tensor({4, 3}, {DType::Float32, Device::cuda()});
  CHECK_THROWS_WITH_AS(ops::embedding(w, int_tensor({0}, {1})),
                       doctest::Contains("embedding: inputs are on different devices"), Error);
}

// ------------------------------------------------------- embedding_dropout

namespace {
// dropout(embedding(w, idx) + pos) as the three ops, drawing from a
// generator of `seed` (so a fused call with the same seed draws the same mask).
Tensor unfused_embedding_dropout(const Tensor& w, const Tensor& idx, const Tensor& pos, double p, bool training,
                                 uint64_t seed) {
  Generator gen(seed);
  Tensor x = ops::embedding(w, idx);
  if (pos.defined()) x = ops::add(x, pos);
  return ops::dropout(x, p, training, &gen);
}
Tensor fused_embedding_dropout(const Tensor& w, const Tensor& idx, const Tensor& pos, double p, bool training,
                               uint64_t seed) {
  Generator gen(seed);
  return ops::embedding_dropout(w, idx, pos, p, training, &gen);
}
}  // namespace

TEST_CASE("embedding_dropout: the three ops composed, float64 gradcheck, errors") {
  Tensor w = random_tensor({7, 5}, kF64Grad), pos = random_tensor({4, 5}, kF64Grad);
  Tensor idx = random_indices(12, 7, 3).reshape({3, 4});
  for (double p : {0.0, 0.3}) {
    CAPTURE(p);
    Tensor a = fused_embedding_dropout(w, idx, pos, p, true, 11), b = unfused_embedding_dropout(w, idx, pos, p, true, 11);
    CHECK(a.to_vector<double>() == b.to_vector<double>());
    CHECK(gradcheck([&](const std::vector<Tensor>& in) { return fused_embedding_dropout(in[0], idx, in[1], p, true, 11); },
                    {w, pos}));
  }
  CHECK(gradcheck([&](const std::vector<Tensor>& in) { return fused_embedding_dropout(in[0], idx, Tensor(), 0.3, true, 5); },
                  {w}));
  CHECK_THROWS_WITH_AS(ops::embedding_dropout(w, idx, random_tensor({3, 5}), 0.1, true),
                       doctest::Contains("positions float64 [3, 5] on cpu must be (T, C) = (4, 5)"), Error);
  CHECK_THROWS_WITH_AS(ops::embedding_dropout(w, idx, pos, 1.0, true), doctest::Contains("p must be in [0, 1)"), Error);
}

TEST_CASE("embedding_dropout CUDA: the bits of the three CUDA ops, forward and backward; CPU parity") {
  MINIDL_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (int64_t C : {64, 5}) {  // 16-byte packs, and one element per thread
      for (bool with_pos : {true, false}) {
        for (double p : {0.0, 0.25}) {
          for (bool training : {true, false}) {
            CAPTURE(dtype);
            CAPTURE(C);
            CAPTURE(with_pos);
            CAPTURE(p);
            CAPTURE(training);
            const int64_t V = 9, B = 3, T = 16;
            Tensor w_cpu = random_tensor({V, C}, {dtype}), pos_cpu = random_tensor({T, C}, {dtype});
            std::vector<int32_t> ids(static_cast<size_t>(B * T));
            for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 5 + 2) % V);
            Tensor idx = int_tensor(ids, {B, T}, gpu);
            auto leaf = [&](const Tensor& t) { return t.to(gpu).requires_grad_(true); };
            Tensor w1 = leaf(w_cpu), w2 = leaf(w_cpu), p1 = leaf(pos_cpu), p2 = leaf(pos_cpu);
            Tensor fused = fused_embedding_dropout(w1, idx, with_pos ? p1 : Tensor(), p, training, 21);
            Tensor unfused = unfused_embedding_dropout(w2, idx, with_pos ? p2 : Tensor(), p, training, 21);
            check_close(fused, unfused, 0, 0);
            Tensor seed = random_tensor({B, T, C}, {dtype}).to(gpu);
            fused.backward(seed);
            unfused.backward(seed);
            // The gradients sum rows with atomics: float32 differs in the last
            // bits from run to run (bfloat16 rounds that away).
            const double gtol = dtype == DType::Float32 ? 1e-5 : 0;
            check_close(w1.grad(), w2.grad(), gtol, gtol);
            if (with_pos) check_close(p1.grad(), p2.grad(), gtol, gtol);
            // Against the CPU composition (the same mask).
            Tensor cpu = unfused_embedding_dropout(w_cpu, idx.to(Device::cpu()), with_pos ? pos_cpu : Tensor(), p,
                                                   training, 21);
            check_close(fused, cpu, dtype == DType::BFloat16 ? 1e-2 : 1e-6, dtype == DType::BFloat16 ? 1e-2 : 1e-6);
          }
        }
      }
    }
  }
  // Out-of-range ids read zeros (positions still added), as the embedding kernel does.
  Tensor w = random_tensor({3, 8}, {DType::Float32}).to(gpu), pos = random_tensor({2, 8}, {DType::Float32}).to(gpu);
  Tensor bad = int_tensor({1, 7}, {1, 2}, gpu);
  check_close(ops::embedding_dropout(w, bad, pos, 0.0, false),
              ops::add(ops::embedding(w, bad), pos), 0, 0);
}

// ------------------------------------------------------------- index_select

TEST_CASE("index_select picks rows along any dim") {
  Tensor x = ops::arange(0, 24, 1, {DType::Float32}).reshape({2, 3, 4});
  Tensor i = int_tensor({2, 0, 2}, {3});
  Tensor d1 = ops::index_select(x, 1, i);
  CHECK(d1.shape() == Shape{2, 3, 4});
  CHECK(d1.to_vector<float>() == std::vector<float>{8,  9,  10, 11, 0,  1,  2,  3,  8,  9,  10, 11,
                                                    20, 21, 22, 23, 12, 13, 14, 15, 20, 21, 22, 23});
  Tensor d2 = ops::index_select(x, -1, int_tensor({3, 1}, {2}));
  CHECK(d2.shape() == Shape{2, 3, 2});
  CHECK(d2.to_vector<float>() == std::vector<float>{3, 1, 7, 5, 11, 9, 15, 13, 19, 17, 23, 21});
  Tensor d0 = ops::index_select(x, 0, int_tensor({1}, {1}));
  CHECK(d0.shape() == Shape{1, 3, 4});
  CHECK(d0.to_vector<float>() == x.slice(0, 1, 2).to_vector<float>());
  // Empty index list and int32 data.
  CHECK(ops::index_select(x, 1, int_tensor({}, {0})).shape() == Shape{2, 0, 4});
  Tensor xi = int_tensor({5, 6, 7}, {3});
  CHECK(ops::index_select(xi, 0, int_tensor({2, 2, 0}, {3})).to_vector<int32_t>() ==
        std::vector<int32_t>{7, 7, 5});
  // Non-contiguous input.
  Tensor xt = x.transpose(0, 2);  // (4, 3, 2)
  CHECK(ops::index_select(xt, 0, int_tensor({1}, {1})).to_vector<float>() ==
        std::vector<float>{1, 13, 5, 17, 9, 21});
}

TEST_CASE("index_select backward is index_add") {
  Tensor x = ops::zeros({2, 3}, kF64Grad);
  Tensor seed = from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3});
  ops::index_select(x, 1, int_tensor({2, 2, 0}, {3})).backward(seed);
  CHECK(x.grad().to_vector<double>() == std::vector<double>{3, 0, 3, 6, 0, 9});
}

TEST_CASE("index_select gradcheck over dims, with repeats and non-contiguous inputs") {
  Tensor x = random_tensor({3, 4, 5}, kF64Grad);
  for (int64_t dim : {0, 1, 2, -1}) {
    CAPTURE(dim);
    int64_t size = x.size(dim);
    Tensor idx = int_tensor({static_cast<int32_t>(size - 1), 0, static_cast<int32_t>(size - 1), 1}, {4});
    CHECK(gradcheck([&](const std::vector<Tensor>& in) { return ops::index_select(in[0], dim, idx); },
                    {x}));
  }
  Tensor xt = transposed_leaf({4, 6});
  Tensor idx = int_tensor({5, 5, 2}, {3});
  CHECK(gradcheck(
      [&](const std::vector<Tensor>& in) { return ops::exp(ops::index_select(in[0], 1, idx)); }, {xt}));
}

TEST_CASE("index_select errors") {
  Tensor x = random_tensor({3, 4});
  CHECK_THROWS_WITH_AS(ops::index_select(x, 1, int_tensor({0, 4}, {2})),
                       doctest::Contains("index_select: index 4 at position 1 is out of range for dim 1 of size 4"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::index_select(x, 0, int_tensor({0, 1}, {1, 2})),
                       doctest::Contains("index_select: indices must be 1-D"), Error);
  CHECK_THROWS_WITH_AS(ops::index_select(x, 0, random_tensor({2})),
                       doctest::Contains("index_select: indices must be int32"), Error);
  CHECK_THROWS_WITH_AS(ops::index_select(x, 2, int_tensor({0}, {1})),
                       doctest::Contains("index_select: dim 2 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::index_select(random_tensor({}), 0, int_tensor({0}, {1})),
                       doctest::Contains("index_select: input is zero-dimensional"), Error);
}

TEST_CASE("index_select CUDA matches CPU (float32, bfloat16), forward and backward") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (int64_t dim : {0, 1, 2}) {
      CAPTURE(dtype);
      CAPTURE(dim);
      Tensor x_cpu = random_tensor({6, 7, 9}, {dtype, Device::cpu(), true});
      Tensor x_cuda = x_cpu.detach().to(Device::cuda()).requires_grad_(true);
      Tensor idx = random_indices(40, x_cpu.size(dim), 100 + dim);
      Tensor out_cpu = ops::index_select(x_cpu, dim, idx);
      Tensor out_cuda = ops::index_select(x_cuda, dim, idx.to(Device::cuda()));
      check_close(out_cuda, out_cpu, 0, 0);
      Tensor seed = random_tensor(out_cpu.shape(), {dtype});
      out_cpu.backward(seed);
      out_cuda.backward(seed.to(Device::cuda()));
      double tol = dtype == DType::Float32 ? 1e-5 : 1e-2;
      check_close(x_cuda.grad(), x_cpu.grad(), tol, tol);
    }
  }
}

// --------------------------------------------------------------------- cat

TEST_CASE("cat joins along a dim, including empty and non-contiguous inputs") {
  Tensor a = ops::arange(0, 6, 1, {DType::Float32}).reshape({2, 3});
  Tensor b = ops::arange(6, 8, 1, {DType::Float32}).reshape({2, 1});
  Tensor c = ops::zeros({2, 0});
  Tensor d1 = ops::cat({a, b, c}, 1);
  CHECK(d1.shape() == Shape{2, 4});
  CHECK(d1.to_vector<float>() == std::vector<float>{0, 1, 2, 6, 3, 4, 5, 7});
  Tensor d0 = ops::cat({a, a.slice(0, 1, 2)}, -2);
  CHECK(d0.shape() == Shape{3, 3});
  CHECK(d0.to_vector<float>() == std::vector<float>{0, 1, 2, 3, 4, 5, 3, 4, 5});
  Tensor at = a.transpose(0, 1);  // (3, 2), non-contiguous
  Tensor d2 = ops::cat({at, at.slice(1, 0, 2, 2)}, 1);
  CHECK(d2.to_vector<float>() == std::vector<float>{0, 3, 0, 1, 4, 1, 2, 5, 2});
  Tensor single = ops::cat({a}, 0);
  CHECK(single.to_vector<float>() == a.to_vector<float>());
  CHECK(single.storage() != a.storage());
  Tensor ints = ops::cat({int_tensor({1, 2}, {2}), int_tensor({3}, {1})}, 0);
  CHECK(ints.to_vector<int32_t>() == std::vector<int32_t>{1, 2, 3});
}

TEST_CASE("cat gradcheck; inputs that do not require grad get none") {
  Tensor a = random_tensor({2, 3, 2}, kF64Grad);
  Tensor b = random_tensor({2, 1, 2}, kF64Grad);
  Tensor ct = transposed_leaf({4, 2});                  // (4, 2) non-contiguous leaf
  Tensor constant = random_tensor({2, 2, 2});
  CHECK(gradcheck([&](const std::vector<Tensor>& x) { return ops::cat({x[0], constant, x[1]}, 1); },
                  {a, b}));
  CHECK(gradcheck([&](const std::vector<Tensor>& x) {
                    return ops::cat({ops::exp(x[0]), x[0], x[1]}, 0);
                  },
                  {ct, random_tensor({1, 2}, kF64Grad)}));
  Tensor y = ops::cat({a, constant}, 1);
  sum_sq(y).backward();
  CHECK(a.grad().defined());
  CHECK_FALSE(constant.grad().defined());
}

TEST_CASE("cat errors") {
  Tensor a = random_tensor({2, 3});
  CHECK_THROWS_WITH_AS(ops::cat({}, 0), doctest::Contains("cat: expected a non-empty list"), Error);
  CHECK_THROWS_WITH_AS(ops::cat({a, random_tensor({3, 3})}, 1),
                       doctest::Contains("cat: input 1 has shape [3, 3] but input 0 has [2, 3]; sizes "
                                         "must match except in dim 1"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::cat({a, random_tensor({2, 3, 1})}, 0),
                       doctest::Contains("cat: input 1 has shape [2, 3, 1]"), Error);
  CHECK_THROWS_WITH_AS(ops::cat({a, random_tensor({2, 3}, {DType::Float32})}, 0),
                       doctest::Contains("cat: input 1 is float32 [2, 3] on cpu but input 0 is float64"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::cat({a, Tensor()}, 0), doctest::Contains("cat: input 1 is an undefined"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::cat({random_tensor({})}, 0), doctest::Contains("cat: input 0 is zero-dimensional"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::cat({a, a}, 2), doctest::Contains("cat: dim 2 is out of range"), Error);
}

TEST_CASE("cat CUDA matches CPU (float32, bfloat16); device mismatch error") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    Tensor a = random_tensor({3, 5, 4}, {dtype});
    Tensor base = random_tensor({4, 3, 3}, {dtype});  // permuted below: non-contiguous input
    Tensor c = random_tensor({3, 2, 4}, {dtype});
    Tensor out_cpu = ops::cat({a, base.permute({1, 2, 0}), c}, 1);
    Tensor out_cuda = ops::cat({a.to(Device::cuda()), base.to(Device::cuda()).permute({1, 2, 0}),
                                c.to(Device::cuda())},
                               1);
    check_close(out_cuda, out_cpu, 0, 0);
  }
  CHECK_THROWS_WITH_AS(ops::cat({random_tensor({2}), random_tensor({2}, {DType::Float64, Device::cuda()})}, 0),
                       doctest::Contains("cat: input 1 is float64 [2] on cuda:0 but input 0 is float64 [2] on cpu"),
                       Error);
}

TEST_CASE("cat CUDA of contiguous inputs (one launch per 8): every pack width, empty inputs, more than 8 inputs") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float64}) {
    CAPTURE(dtype);
    // widths per row: 16-byte packs (8, 16, 24), odd widths (3: one element
    // per thread), an empty input, and a split like the qkv gradient's.
    for (const std::vector<int64_t>& sizes :
         {std::vector<int64_t>{8, 16, 24}, std::vector<int64_t>{3, 0, 5, 2}, std::vector<int64_t>{64, 64, 64},
          std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11},
          // more than 8, with empty ones among the first 8: a launch takes 8 non-empty inputs
          std::vector<int64_t>{1, 0, 2, 3, 0, 4, 5, 6, 7, 8, 9, 0, 10}}) {
      CAPTURE(shape_str(sizes));
      for (int64_t dim : {0, 1, 2}) {
        CAPTURE(dim);
        std::vector<Tensor> cpu, gpu;
        for (int64_t size : sizes) {
          Shape shape{5, 3, 2};
          shape[static_cast<size_t>(dim)] = size;
          cpu.push_back(random_tensor(shape, {dtype}));
          gpu.push_back(cpu.back().to(Device::cuda()));
        }
        check_close(ops::cat(gpu, dim), ops::cat(cpu, dim), 0, 0);  // a copy is exact
      }
    }
  }
  // Inputs that start mid-pack (storage offset 1): narrower packs, the same values.
  Tensor flat = random_tensor({68}, {DType::BFloat16}), b = random_tensor({4, 8}, {DType::BFloat16});
  Tensor a = flat.narrow(0, 1, 64).reshape({4, 16});
  Tensor ga = flat.to(Device::cuda()).narrow(0, 1, 64).reshape({4, 16});
  REQUIRE(ga.is_contiguous());
  check_close(ops::cat({ga, b.to(Device::cuda())}, 1), ops::cat({a, b}, 1), 0, 0);
}

// ------------------------------------------------------------------- stack

TEST_CASE("stack adds a new dim") {
  Tensor a = from_vector(std::vector<float>{1, 2, 3}, {3});
  Tensor b = from_vector(std::vector<float>{4, 5, 6}, {3});
  Tensor s0 = ops::stack({a, b}, 0);
  CHECK(s0.shape() == Shape{2, 3});
  CHECK(s0.to_vector<float>() == std::vector<float>{1, 2, 3, 4, 5, 6});
  Tensor s1 = ops::stack({a, b}, 1);
  CHECK(s1.shape() == Shape{3, 2});
  CHECK(s1.to_vector<float>() == std::vector<float>{1, 4, 2, 5, 3, 6});
  Tensor sm = ops::stack({a, b, a}, -1);
  CHECK(sm.shape() == Shape{3, 3});
  CHECK(sm.to_vector<float>() == std::vector<float>{1, 4, 1, 2, 5, 2, 3, 6, 3});
  Tensor scalars = ops::stack({ops::full({}, 7.0), ops::full({}, 8.0)}, 0);
  CHECK(scalars.shape() == Shape{2});
  CHECK(scalars.to_vector<float>() == std::vector<float>{7, 8});
}

TEST_CASE("stack gradcheck and errors") {
  Tensor a = random_tensor({2, 3}, kF64Grad);
  Tensor b = transposed_leaf({2, 3});
  for (int64_t dim : {0, 1, 2, -1}) {
    CAPTURE(dim);
    CHECK(gradcheck([&](const std::vector<Tensor>& x) { return ops::stack({x[0], ops::tanh(x[1]), x[0]}, dim); },
                    {a, b}));
  }
  CHECK_THROWS_WITH_AS(ops::stack({}, 0), doctest::Contains("stack: expected a non-empty list"), Error);
  CHECK_THROWS_WITH_AS(ops::stack({random_tensor({2, 3}), random_tensor({3, 2})}, 0),
                       doctest::Contains("stack: input 1 has shape [3, 2] but input 0 has [2, 3]"), Error);
  CHECK_THROWS_WITH_AS(ops::stack({random_tensor({2, 3})}, 3), doctest::Contains("stack: dim 3 is out of range"),
                       Error);
}

// ------------------------------------------------------------------- split

TEST_CASE("split returns views of equal chunks, the last one smaller") {
  Tensor x = ops::arange(0, 14, 1, {DType::Float32}).reshape({7, 2});
  std::vector<Tensor> parts = ops::split(x, 3, 0);
  REQUIRE(parts.size() == 3);
  CHECK(parts[0].shape() == Shape{3, 2});
  CHECK(parts[2].shape() == Shape{1, 2});
  CHECK(parts[1].to_vector<float>() == std::vector<float>{6, 7, 8, 9, 10, 11});
  CHECK(parts[2].to_vector<float>() == std::vector<float>{12, 13});
  for (const Tensor& p : parts) CHECK(p.storage() == x.storage());
  ops::fill_(parts[1], -1.0);  // writes through the view land in x
  CHECK(x.to_vector<float>()[6] == -1.0f);
  CHECK(x.to_vector<float>()[12] == 12.0f);
  std::vector<Tensor> cols = ops::split(x, 1, -1);
  REQUIRE(cols.size() == 2);
  CHECK(cols[1].shape() == Shape{7, 1});
  CHECK(ops::split(x, 10, 0).size() == 1);
  CHECK(ops::split(ops::zeros({0, 2}), 3, 0).size() == 1);
}

TEST_CASE("split by sizes") {
  Tensor x = ops::arange(0, 10, 1, {DType::Float32}).reshape({2, 5});
  std::vector<Tensor> parts = ops::split(x, std::vector<int64_t>{2, 0, 3}, 1);
  REQUIRE(parts.size() == 3);
  CHECK(parts[0].to_vector<float>() == std::vector<float>{0, 1, 5, 6});
  CHECK(parts[1].shape() == Shape{2, 0});
  CHECK(parts[2].to_vector<float>() == std::vector<float>{2, 3, 4, 7, 8, 9});
}

TEST_CASE("split gradcheck: gradients of all parts meet in the input") {
  Tensor x = transposed_leaf({7, 3});
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) {
        std::vector<Tensor> p = ops::split(in[0], 3, 0);
        return ops::cat({ops::exp(p[2]), ops::mul(p[0], 2.0), p[1]}, 0);
      },
      {x}));
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) {
        std::vector<Tensor> p = ops::split(in[0], std::vector<int64_t>{1, 2}, 1);
        return ops::mul(p[0], p[1]);  // (7, 1) * (7, 2), broadcast
      },
      {x}));
  // A part left unused gets zeros.
  Tensor y = random_tensor({4, 2}, kF64Grad);
  ops::sum(ops::split(y, 2, 0)[1]).backward();
  CHECK(y.grad().to_vector<double>() == std::vector<double>{0, 0, 0, 0, 1, 1, 1, 1});
}

TEST_CASE("split: parts' gradients lying side by side in one buffer come back as that buffer") {
  // An op may write its inputs' gradients as slices of one allocation (the
  // attention backward does for q, k, v of a fused projection): split's
  // backward then hands that buffer on instead of concatenating a copy.
  Tensor w = random_tensor({2, 3, 6}).requires_grad_(true);
  Tensor packed = random_tensor({2, 3, 6});
  auto slice = [&](int64_t i) { return packed.as_strided({2, 3, 2}, packed.strides(), 2 * i); };
  // Returns the gradient that split's backward passed to x's producer.
  auto split_gradient = [&](std::vector<Tensor> grads) {
    Tensor seen;
    Tensor x = w.detach().clone();
    autograd::record("probe", {w}, {x}, [&seen](const std::vector<Tensor>& g) {
      seen = g[0];
      return g;
    });
    std::vector<Tensor> parts = ops::split(x, 2, 2);
    Tensor z = Tensor::empty({1}, {DType::Float64});
    autograd::record("packed_grads", parts, {z}, [grads](const std::vector<Tensor>&) { return grads; });
    z.backward(ops::ones({1}, {DType::Float64}));
    return seen;
  };
  Tensor in_order = split_gradient({slice(0), slice(1), slice(2)});
  CHECK(in_order.storage() == packed.storage());
  CHECK(in_order.to_vector<double>() == packed.to_vector<double>());
  // Out of order: concatenated, as cat would.
  Tensor swapped = split_gradient({slice(1), slice(0), slice(2)});
  CHECK(swapped.storage() != packed.storage());
  CHECK(swapped.to_vector<double>() == ops::cat({slice(1), slice(0), slice(2)}, 2).to_vector<double>());
}

TEST_CASE("split backward: gradients that lie side by side in one buffer are used in place, others concatenated") {
  // cat's backward hands out slices of its upstream gradient: in the split's
  // order they tile it (no copy), in another order they do not (a copy).
  for (int64_t dim : {0, 1}) {
    CAPTURE(dim);
    for (bool in_order : {true, false}) {
      CAPTURE(in_order);
      Tensor x = random_tensor({6, 6}, kF64Grad);
      std::vector<Tensor> p = ops::split(x, 2, dim);  // three parts
      Tensor y = ops::cat(in_order ? p : std::vector<Tensor>{p[1], p[0], p[2]}, dim);
      Tensor seed = random_tensor(y.shape());
      y.backward(seed);
      std::vector<Tensor> s = ops::split(seed, 2, dim);
      Tensor expected = in_order ? seed : ops::cat({s[1], s[0], s[2]}, dim);
      CHECK(x.grad().to_vector<double>() == expected.to_vector<double>());
      // The leaf's gradient never shares memory with the caller's seed.
      const bool shared = x.grad().storage() == seed.storage();
      CHECK_FALSE(shared);
    }
  }
}

TEST_CASE("split errors") {
  Tensor x = random_tensor({4, 3});
  CHECK_THROWS_WITH_AS(ops::split(x, 0, 0), doctest::Contains("split: split_size must be positive, got 0"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::split(x, std::vector<int64_t>{1, 2}, 0),
                       doctest::Contains("split: sizes [1, 2] sum to 3 but dim 0 of float64 [4, 3] on cpu has size 4"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::split(x, std::vector<int64_t>{5, -1}, 0),
                       doctest::Contains("split: negative size -1"), Error);
  CHECK_THROWS_WITH_AS(ops::split(x, 1, 2), doctest::Contains("split: dim 2 is out of range"), Error);
}
