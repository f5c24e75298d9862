// The train/val split, the batch sampler and the random_windows op it
// samples with (charlm's character vocabulary: examples/charlm/tests).
#include <set>

#include "core/philox.h"
#include "tests/helpers.h"

using namespace minidl;

TEST_CASE("split_train_val: first 90% train, rest validate") {
  std::vector<int32_t> tokens(100);
  for (int i = 0; i < 100; ++i) tokens[i] = i;
  nn::TrainValSplit split = nn::split_train_val(tokens);
  CHECK(split.train.size() == 90);
  CHECK(split.val.size() == 10);
  CHECK(split.train.front() == 0);
  CHECK(split.train.back() == 89);
  CHECK(split.val.front() == 90);
  nn::TrainValSplit odd = nn::split_train_val(std::vector<int32_t>(7, 1));
  CHECK(odd.train.size() == 6);  // floor(6.3)
  CHECK(odd.val.size() == 1);
  CHECK(nn::split_train_val(tokens, 0.5).train.size() == 50);
  CHECK_THROWS_WITH_AS(nn::split_train_val(tokens, 1.0), doctest::Contains("train_fraction must be in (0, 1)"),
                       Error);
}

TEST_CASE("BatchSampler: y is x shifted by one, windows in range, deterministic by seed") {
  std::vector<int32_t> tokens(50);
  for (int i = 0; i < 50; ++i) tokens[i] = i;  // token value = position
  nn::BatchSampler a(tokens, 4, 8, 123), b(tokens, 4, 8, 123), c(tokens, 4, 8, 124);
  std::set<int32_t> starts;
  bool differs = false;
  for (int step = 0; step < 50; ++step) {
    auto [x, y] = a.next();
    auto [xb, yb] = b.next();
    auto [xc, yc] = c.next();
    CHECK(x.shape() == Shape{4, 8});
    CHECK(y.shape() == Shape{4, 8});
    CHECK(x.dtype() == DType::Int32);
    std::vector<int32_t> xv = x.to_vector<int32_t>(), yv = y.to_vector<int32_t>();
    CHECK(xv == xb.to_vector<int32_t>());
    CHECK(yv == yb.to_vector<int32_t>());
    differs |= xv != xc.to_vector<int32_t>();
    for (int r = 0; r < 4; ++r) {
      int32_t start = xv[r * 8];
      CHECK(start >= 0);
      CHECK(start + 8 <= 49);  // the window of 9 tokens fits
      starts.insert(start);
      for (int t = 0; t < 8; ++t) {
        CHECK(xv[r * 8 + t] == start + t);
        CHECK(yv[r * 8 + t] == start + t + 1);
      }
    }
  }
  CHECK(differs);
  // 200 draws from 42 possible starts reach both ends and most of the range.
  CHECK(starts.count(0) == 1);
  CHECK(starts.count(41) == 1);
  CHECK(starts.size() > 35);
  // Restoring the generator replays the stream.
  nn::BatchSampler d(tokens, 4, 8, 123);
  d.generator().set_state(123, 10);
  nn::BatchSampler e(tokens, 4, 8, 123);
  for (int i = 0; i < 10; ++i) e.next();
  CHECK(d.next().first.to_vector<int32_t>() == e.next().first.to_vector<int32_t>());
}

TEST_CASE("BatchSampler: the shortest usable split is one context + 1") {
  nn::BatchSampler exact(std::vector<int32_t>{4, 5, 6}, 2, 2, 1);
  auto [x, y] = exact.next();
  CHECK(x.to_vector<int32_t>() == std::vector<int32_t>{4, 5, 4, 5});
  CHECK(y.to_vector<int32_t>() == std::vector<int32_t>{5, 6, 5, 6});
  CHECK_THROWS_WITH_AS(nn::BatchSampler(std::vector<int32_t>{1, 2}, 2, 2, 1, Device::cpu(), "val"),
                       doctest::Contains("BatchSampler(val): the split has 2 tokens, fewer than one "
                                         "context + 1 = 3 (block_size 2)"),
                       Error);
  CHECK_THROWS_WITH_AS(nn::BatchSampler(std::vector<int32_t>{}, 1, 4, 1),
                       doctest::Contains("the split has 0 tokens"), Error);
  CHECK_THROWS_WITH_AS(nn::BatchSampler(std::vector<int32_t>(10, 0), 0, 4, 1),
                       doctest::Contains("batch_size and block_size must be positive"), Error);
}

TEST_CASE("BatchSampler on CUDA gives the CPU batches") {
  MINIDL_REQUIRE_CUDA();
  std::vector<int32_t> tokens(1000);
  for (int i = 0; i < 1000; ++i) tokens[i] = (i * 37) % 65;
  nn::BatchSampler cpu(tokens, 8, 16, 9), gpu(tokens, 8, 16, 9, Device::cuda());
  for (int i = 0; i < 3; ++i) {
    auto [xc, yc] = cpu.next();
    auto [xg, yg] = gpu.next();
    CHECK(xg.is_cuda());
    CHECK(yg.is_cuda());
    CHECK(xg.to_vector<int32_t>() == xc.to_vector<int32_t>());
    CHECK(yg.to_vector<int32_t>() == yc.to_vector<int32_t>());
  }
}

TEST_CASE("random_windows: row b starts at philox::uniform_below(seed, offset, b, n - length)") {
  std::vector<int32_t> values(300);
  for (int i = 0; i < 300; ++i) values[i] = 1000 + i;  // token = 1000 + position
  Tensor tokens = from_vector(values, {300}, {DType::Int32});
  Generator gen(77);
  gen.set_state(77, 5);
  auto [x, y] = ops::random_windows(tokens, 6, 10, &gen);
  CHECK(gen.offset() == 6);  // one offset per call
  CHECK(x.dtype() == DType::Int32);
  CHECK(x.shape() == Shape{6, 10});
  CHECK(y.shape() == Shape{6, 10});
  std::vector<int32_t> xv = x.to_vector<int32_t>(), yv = y.to_vector<int32_t>();
  std::set<int64_t> starts;
  for (int b = 0; b < 6; ++b) {
    const auto start = static_cast<int64_t>(philox::uniform_below(77, 5, static_cast<uint64_t>(b), 290));
    starts.insert(start);
    for (int t = 0; t < 10; ++t) {
      CHECK(xv[b * 10 + t] == 1000 + start + t);
      CHECK(yv[b * 10 + t] == 1001 + start + t);
    }
  }
  CHECK(starts.size() > 1);
  // A strided view of the tokens samples its own elements.
  Tensor every_other = ops::arange(40, {DType::Int32}).slice(0, 0, 40, 2);  // 0, 2, ..., 38
  auto [xs, ys] = ops::random_windows(every_other, 4, 5, &gen);
  std::vector<int32_t> xsv = xs.to_vector<int32_t>(), ysv = ys.to_vector<int32_t>();
  for (size_t i = 0; i < xsv.size(); ++i) {
    CHECK(xsv[i] % 2 == 0);
    CHECK(ysv[i] == xsv[i] + 2);
  }
}

TEST_CASE("random_windows errors") {
  Generator gen(1);
  Tensor tokens = from_vector(std::vector<int32_t>{1, 2, 3}, {3}, {DType::Int32});
  CHECK_THROWS_WITH_AS(ops::random_windows(tokens, 2, 3, &gen),
                       doctest::Contains("random_windows: 3 tokens hold no window of length + 1 = 4"), Error);
  CHECK_THROWS_WITH_AS(ops::random_windows(tokens, 0, 2, &gen),
                       doctest::Contains("random_windows: batch and length must be positive, got 0 and 2"), Error);
  CHECK_THROWS_WITH_AS(ops::random_windows(ops::zeros({2, 3}, {DType::Int32}), 1, 1, &gen),
                       doctest::Contains("tokens must be a 1-D int32 tensor, got int32 [2, 3]"), Error);
  CHECK_THROWS_WITH_AS(ops::random_windows(ops::zeros({8}, {DType::Float32}), 1, 1, &gen),
                       doctest::Contains("tokens must be a 1-D int32 tensor, got float32 [8]"), Error);
  CHECK(gen.offset() == 0);  // nothing reserved by a refused call
}

TEST_CASE("random_windows on CUDA: the CPU windows on a large sequence") {
  MINIDL_REQUIRE_CUDA();
  const int64_t n = (1 << 20) + 3;
  std::vector<int32_t> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919) % 100003);
  Tensor cpu_tokens = from_vector(values, {n}, {DType::Int32});
  Tensor gpu_tokens = cpu_tokens.to(Device::cuda());
  Generator cpu_gen(20261201), gpu_gen(20261201);
  for (int i = 0; i < 4; ++i) {
    auto [xc, yc] = ops::random_windows(cpu_tokens, 64, 257, &cpu_gen);  // length not a multiple of 32
    auto [xg, yg] = ops::random_windows(gpu_tokens, 64, 257, &gpu_gen);
    CHECK(xg.is_cuda());
    CHECK(yg.is_cuda());
    CHECK(xg.to_vector<int32_t>() == xc.to_vector<int32_t>());
    CHECK(yg.to_vector<int32_t>() == yc.to_vector<int32_t>());
  }
  CHECK(gpu_gen.offset() == cpu_gen.offset());
}
