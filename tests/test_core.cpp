#include <cmath>
#include <limits>

#include "core/allocator.h"
#include "tests/helpers.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/runtime.h"
#endif

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
  CHECK(Device::parse("cuda:0") == Device::cuda(0));
  CHECK(Device::parse("cuda:12") == Device::cuda(12));
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:1x", "", "cuda: 1", "cuda:+2", "cuda:01", "cuda:1234567890"})
    CHECK_THROWS_WITH_AS(Device::parse(bad), doctest::Contains("Device::parse: expected"), Error);
  CHECK(contiguous_strides({2, 3, 4}) == Shape{12, 4, 1});
  CHECK(contiguous_strides({}) == Shape{});
  CHECK(numel({}) == 1);
  CHECK(numel({3, 0}) == 0);
  CHECK(shape_str({2, 3}) == "[2, 3]");
  CHECK(wrap_dim(-1, 3, "op") == 2);
  CHECK(wrap_dim(-1, 0, "op") == 0);  // a 0-d tensor's one dim, as in PyTorch
  CHECK_THROWS_WITH_AS(wrap_dim(-2, 0, "myop"), doctest::Contains("myop: dim -2 is out of range for a tensor of 0 dims"),
                       Error);
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

// Sizes whose products overflow int64; nothing below allocates them.
constexpr int64_t k2e31 = int64_t{1} << 31, k2e33 = int64_t{1} << 33, k2e61 = int64_t{1} << 61,
                  k2e62 = int64_t{1} << 62, kInt64Max = std::numeric_limits<int64_t>::max();

TEST_CASE("checked shape arithmetic refuses int64 overflow") {
  int64_t r = 0;
  CHECK(checked_mul(k2e31, k2e31, &r));
  CHECK(r == k2e62);
  CHECK_FALSE(checked_mul(k2e62, 2, &r));
  CHECK(checked_add(kInt64Max - 1, 1, &r));
  CHECK_FALSE(checked_add(kInt64Max, 1, &r));
  CHECK(checked_numel({k2e62, 1}, "myop") == k2e62);  // near the limit: fine to describe
  CHECK(checked_numel({kInt64Max}, "myop") == kInt64Max);
  CHECK(checked_numel({0, k2e31, k2e31}, "myop") == 0);
  CHECK_THROWS_WITH_AS(checked_numel({k2e33, k2e31}, "myop"),
                       doctest::Contains("myop: shape [8589934592, 2147483648] has more elements than int64 can "
                                         "count (at most 9223372036854775807)"),
                       Error);
  CHECK_THROWS_WITH_AS(checked_numel({k2e62, 2}, "myop"), doctest::Contains("more elements than int64"), Error);
  // A zero size does not excuse the others: the contiguous strides must fit too.
  CHECK_THROWS_WITH_AS(checked_numel({0, k2e33, k2e33}, "myop"), doctest::Contains("more elements than int64"),
                       Error);
  CHECK_THROWS_WITH_AS(checked_numel({3, -2}, "myop"), doctest::Contains("myop: negative size in shape [3, -2]"),
                       Error);
  CHECK(checked_nbytes({k2e61}, 2, "myop") == k2e62);
  CHECK_THROWS_WITH_AS(checked_nbytes({k2e61}, 4, "myop"),
                       doctest::Contains("myop: shape [2305843009213693952] of 4-byte elements needs more bytes "
                                         "than int64 can count"),
                       Error);
  Extent e = checked_extent({2, 3}, {-1, 2}, 5, "myop");
  CHECK(e.lo == 4);
  CHECK(e.hi == 9);
  CHECK(checked_extent({0, 4}, {4, 1}, 7, "myop").hi == 7);
  // 2^62 elements, but the last one sits at 2^62 + (2^61 - 1) * 4 > int64 max.
  CHECK_THROWS_WITH_AS(checked_extent({2, k2e61}, {k2e62, 4}, 0, "myop"),
                       doctest::Contains("myop: a view of shape [2, 2305843009213693952] with strides "
                                         "[4611686018427387904, 4] at offset 0 reaches element offsets beyond what "
                                         "int64 can count"),
                       Error);
}

TEST_CASE("factories refuse shapes whose element or byte count overflows int64") {
  // The reproducer: this shape used to wrap to 0 elements, and a
  // narrow and a sum of it then crashed.
  CHECK_THROWS_WITH_AS(ops::ones({k2e33, k2e31}),
                       doctest::Contains("ones: shape [8589934592, 2147483648] has more elements than int64"), Error);
  CHECK_THROWS_WITH_AS(ops::zeros({k2e33, k2e31}), doctest::Contains("zeros: shape [8589934592, 2147483648]"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::full({k2e33, k2e33}, 2.0), doctest::Contains("full: shape"), Error);
  CHECK_THROWS_WITH_AS(ops::rand({k2e33, k2e31}), doctest::Contains("rand: shape"), Error);
  CHECK_THROWS_WITH_AS(ops::randn({k2e33, k2e31}), doctest::Contains("randn: shape"), Error);
  CHECK_THROWS_WITH_AS(ops::empty({k2e33, k2e31}), doctest::Contains("empty: shape"), Error);
  CHECK_THROWS_WITH_AS(Tensor::empty({-1, k2e33}), doctest::Contains("empty: negative size in shape"), Error);
  // Elements that fit, bytes that do not.
  CHECK_THROWS_WITH_AS(ops::zeros({k2e61}), doctest::Contains("zeros: shape [2305843009213693952] of 4-byte "
                                                               "elements needs more bytes than int64 can count"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::ones({k2e62}, {DType::BFloat16}), doctest::Contains("ones: shape [4611686018427387904] "
                                                                               "of 2-byte elements"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::arange(0, 1e300, 1), doctest::Contains("elements, more than int64 can count"), Error);
  CHECK_THROWS_WITH_AS(ops::arange(0, 1, std::nan("")), doctest::Contains("arange: invalid range"), Error);
  CHECK_THROWS_WITH_AS(from_vector(std::vector<float>{}, {k2e33, k2e31}),
                       doctest::Contains("from_vector: shape [8589934592, 2147483648] has more elements"), Error);
  CHECK(ops::zeros({0, k2e31, k2e31}).numel() == 0);  // empty, with strides that fit: allowed
}

TEST_CASE("as_strided refuses views that reach outside their storage") {
  Tensor t = ops::zeros({4});
  CHECK(t.as_strided({2, 2}, {2, 1}, 0).shape() == Shape{2, 2});
  CHECK(t.as_strided({0, 9}, {9, 1}, 100).numel() == 0);  // empty views reach nothing
  CHECK_THROWS_WITH_AS(t.as_strided({2, 2}, {2, 1}, 1),
                       doctest::Contains("as_strided: a view of shape [2, 2] with strides [2, 1] at offset 1 "
                                         "reaches elements [1, 4] but its storage holds 4 elements"),
                       Error);
  CHECK_THROWS_WITH_AS(t.as_strided({2}, {-1}, 0), doctest::Contains("reaches elements [-1, 0]"), Error);
  CHECK_THROWS_WITH_AS(t.as_strided({2, k2e61}, {k2e62, 4}, 0, "myview"),
                       doctest::Contains("myview: a view of shape"), Error);
}

TEST_CASE("a tensor with no elements is contiguous, whatever its strides") {
  CHECK(Tensor::empty({2, 0}).is_contiguous());
  CHECK(Tensor::empty({1, 4, 0, 3}).is_contiguous());
  CHECK(Tensor::empty({0, 3}).transpose(0, 1).is_contiguous());
  CHECK_FALSE(Tensor::empty({2, 3}).transpose(0, 1).is_contiguous());
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

#if defined(MINIDL_WITH_CUDA)
// Out of device memory, the caching allocator gives its cached blocks back to
// the driver and tries once more (cuda/allocator.cpp): a block of more than
// half the free memory, cached once its tensor dies, leaves too little for a
// second one of another size unless it goes back.
TEST_CASE("CUDA allocator: out of memory, the cached blocks are released and the allocation retried") {
  MINIDL_REQUIRE_CUDA();
  const Device dev = Device::cuda(0);
  backend::DeviceScope scope(dev);
  empty_cache(dev);
  size_t free = 0, total = 0;
  REQUIRE(cudaMemGetInfo(&free, &total) == cudaSuccess);
  constexpr int64_t kMiB = 1 << 20;
  const int64_t first = static_cast<int64_t>(free / 100 * 55) / kMiB * kMiB;  // bytes, a whole MiB
  const int64_t second = first + kMiB;                                        // another cache size
  const TensorOptions ints{DType::Int32, dev, false};
  { Tensor a = ops::empty({first / 4}, ints); }
  const MemoryStats cached = memory_stats(dev);
  CHECK(cached.reserved >= static_cast<size_t>(first));
  Tensor b = ops::empty({second / 4}, ints);
  // The first block went back: with it still reserved, the two would exceed
  // what was free.
  CHECK(memory_stats(dev).reserved == cached.reserved - static_cast<size_t>(first) + static_cast<size_t>(second));
  b = Tensor();
  // Past the device's memory even with the cache released: a clear error.
  CHECK_THROWS_WITH(ops::empty({static_cast<int64_t>(total / 4) + kMiB}, ints),
                    doctest::Contains("cuda allocator: out of memory allocating"));
  empty_cache(dev);
  CHECK(memory_stats(dev).reserved == memory_stats(dev).allocated);
}

// A thread whose current device is cuda:0 computes on cuda:1's tensors:
// each op runs under its tensors' device (backend::DeviceScope), copies
// between the GPUs and the host go on the stream of the GPU involved, and
// the thread's current device is left as it was.
TEST_CASE("CUDA ops and copies run on their tensors' device, not the thread's current one") {
  MINIDL_REQUIRE_CUDA();
  const int gpus = cuda_device_count();
  if (gpus < 2) {
    MESSAGE("skipped: needs 2 or more GPUs (", gpus, " visible)");
    return;
  }
  backend::DeviceScope on0(Device::cuda(0));
  const Device d1 = Device::cuda(1);
  Tensor a = random_tensor({64, 48}), b = random_tensor({48, 32});
  Tensor a1 = a.to(DType::Float32).to(d1), b1 = b.to(DType::Float32).to(d1);
  a1.requires_grad_(true);
  Tensor y1 = ops::softmax(ops::matmul(a1, b1));
  ops::sum(ops::mul(y1, y1)).backward();
  CHECK(cuda::current_device() == 0);
  CHECK(y1.device() == d1);
  CHECK(a1.grad().device() == d1);

  Tensor a64 = a.clone().requires_grad_(true);
  Tensor y = ops::softmax(ops::matmul(a64, b));
  ops::sum(ops::mul(y, y)).backward();
  check_close(y1, y, 1e-5, 1e-4);
  check_close(a1.grad(), a64.grad(), 1e-5, 1e-4);

  // cuda:1 -> cuda:0 -> cuda:1, each read right after the op that wrote it.
  Tensor z1 = ops::add(y1.detach(), 1.0);
  Tensor z0 = ops::to(z1, Device::cuda(0));
  Tensor back = ops::to(ops::mul(z0, 2.0), d1);
  check_close(back, ops::mul(ops::add(y, 1.0), 2.0), 1e-5, 1e-4);
  CHECK(ops::zeros({5}, {DType::Float32, d1}).to_vector<float>() == std::vector<float>(5, 0.f));
  CHECK(cuda::current_device() == 0);
}
#endif
