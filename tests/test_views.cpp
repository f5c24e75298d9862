// Views (reshape/view, permute, transpose, slice, narrow, expand,
// squeeze/unsqueeze) and copies (contiguous, clone, to): geometry, values,
// sharing of storage, gradients and errors.
#include <limits>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64Grad{DType::Float64, Device::cpu(), true};

Tensor iota(const Shape& shape, DType dtype = DType::Float32) {
  return ops::arange(0, static_cast<double>(numel(shape)), 1, {dtype}).reshape(shape);
}

std::vector<float> vals(const Tensor& t) { return t.to_vector<float>(); }

// A float64 leaf laid out transposed in memory (non-contiguous).
Tensor transposed_leaf(const Shape& shape) {
  Tensor t = random_tensor({shape[1], shape[0]}).transpose(0, 1);
  t.requires_grad_(true);
  return t;
}

}  // namespace

TEST_CASE("reshape and view of a contiguous tensor share storage; -1 is inferred") {
  Tensor x = iota({2, 3, 4});
  Tensor v = x.view({6, 4});
  CHECK(v.shape() == Shape{6, 4});
  CHECK(v.storage() == x.storage());
  CHECK(x.reshape({-1}).shape() == Shape{24});
  CHECK(x.reshape({4, -1, 2}).shape() == Shape{4, 3, 2});
  CHECK(x.reshape({2, 1, -1, 1}).shape() == Shape{2, 1, 12, 1});
  CHECK(vals(x.reshape({3, 8})) == vals(x));
  CHECK(ops::zeros({0, 3}).reshape({-1, 3}).shape() == Shape{0, 3});
  CHECK(ops::full({}, 5.0).reshape({1, 1}).shape() == Shape{1, 1});
  CHECK(ops::zeros({1, 1}).reshape({}).shape() == Shape{});
}

TEST_CASE("view of non-contiguous tensors: allowed when strides permit, else an error") {
  Tensor x = iota({4, 6});
  Tensor rows = x.slice(0, 1, 3);  // rows 1..2: contiguous rows, offset 6
  Tensor flat = rows.view({12});
  CHECK(flat.storage() == x.storage());
  CHECK(vals(flat) == std::vector<float>{6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17});
  Tensor cols = x.slice(1, 0, 4);  // (4, 4) with row stride 6
  Tensor split_view = cols.view({2, 2, 4});  // splitting a dim is always possible
  CHECK(split_view.strides() == Shape{12, 6, 1});
  CHECK(vals(split_view) == vals(cols));
  Tensor t = x.transpose(0, 1);  // (6, 4)
  CHECK(t.view({3, 2, 4}).storage() == x.storage());
  CHECK_THROWS_WITH_AS(t.view({24}), doctest::Contains("view: cannot view float32 [6, 4] on cpu with strides "
                                                        "[1, 6] as [24] without a copy; use reshape"),
                       Error);
  CHECK_THROWS_WITH_AS(cols.view({16}), doctest::Contains("view: cannot view"), Error);
  // reshape copies instead.
  Tensor r = t.reshape({24});
  CHECK(r.storage() != x.storage());
  CHECK(vals(r) == vals(t.contiguous()));
  CHECK(vals(r)[1] == 6.0f);
  // No elements: any shape of zero elements is a view, whatever the strides.
  Tensor empty_t = Tensor::empty({0, 3}).transpose(0, 1);
  CHECK(empty_t.view({0}).numel() == 0);
  CHECK(empty_t.view({3, 0, 1}).shape() == Shape{3, 0, 1});
}

TEST_CASE("reshape errors") {
  Tensor x = iota({2, 3});
  CHECK_THROWS_WITH_AS(x.reshape({-1, -1}), doctest::Contains("reshape: only one dim may be -1 in [-1, -1]"), Error);
  CHECK_THROWS_WITH_AS(x.reshape({4, -1}), doctest::Contains("reshape: cannot infer -1 in [4, -1] for 6 elements"),
                       Error);
  CHECK_THROWS_WITH_AS(x.reshape({7}), doctest::Contains("reshape: shape [7] does not match 6 elements"), Error);
  CHECK_THROWS_WITH_AS(x.reshape({-2, 3}), doctest::Contains("reshape: invalid size -2"), Error);
  CHECK_THROWS_WITH_AS(x.view({0, -1}), doctest::Contains("view: cannot infer -1"), Error);
}

TEST_CASE("permute and transpose") {
  Tensor x = iota({2, 3, 4});
  Tensor p = x.permute({2, 0, 1});
  CHECK(p.shape() == Shape{4, 2, 3});
  CHECK(p.strides() == Shape{1, 12, 4});
  CHECK(p.storage() == x.storage());
  CHECK(vals(p.slice(0, 1, 2)) == std::vector<float>{1, 5, 9, 13, 17, 21});
  Tensor t = x.transpose(-1, 0);
  CHECK(t.shape() == Shape{4, 3, 2});
  CHECK(vals(t.contiguous())[1] == 12.0f);
  CHECK(vals(x.permute({-3, -2, -1})) == vals(x));
  CHECK_THROWS_WITH_AS(x.permute({0, 1}), doctest::Contains("permute: 2 dims given for a tensor of 3 dims"), Error);
  CHECK_THROWS_WITH_AS(x.permute({0, 1, 1}), doctest::Contains("permute: dim 1 repeated"), Error);
  CHECK_THROWS_WITH_AS(x.permute({0, 1, 3}), doctest::Contains("permute: dim 3 is out of range"), Error);
  CHECK_THROWS_WITH_AS(x.transpose(0, 5), doctest::Contains("transpose: dim 5 is out of range"), Error);
}

TEST_CASE("slice with steps, negative indices and clamping; narrow") {
  Tensor x = iota({10});
  CHECK(vals(x.slice(0, 2, 8, 3)) == std::vector<float>{2, 5});
  CHECK(vals(x.slice(0, -3, 10)) == std::vector<float>{7, 8, 9});
  CHECK(vals(x.slice(0, 1, -6, 2)) == std::vector<float>{1, 3});
  CHECK(vals(x.slice(0, -100, 3)) == std::vector<float>{0, 1, 2});  // clamped
  CHECK(vals(x.slice(0, 8, 100)) == std::vector<float>{8, 9});
  CHECK(x.slice(0, 6, 2).numel() == 0);                             // empty, not an error
  CHECK(x.slice(0, 0, 10, 4).shape() == Shape{3});
  CHECK(x.slice(0, 0, 10, 4).strides() == Shape{4});
  Tensor m = iota({4, 5});
  Tensor s = m.slice(1, 1, 5, 2).slice(0, -2, 4);
  CHECK(s.shape() == Shape{2, 2});
  CHECK(s.offset() == 11);
  CHECK(vals(s) == std::vector<float>{11, 13, 16, 18});
  CHECK(vals(m.narrow(1, 3, 2)) == std::vector<float>{3, 4, 8, 9, 13, 14, 18, 19});
  CHECK(m.narrow(0, 4, 0).shape() == Shape{0, 5});
  CHECK_THROWS_WITH_AS(x.slice(0, 0, 5, 0), doctest::Contains("slice: step must be >= 1, got 0"), Error);
  CHECK_THROWS_WITH_AS(m.narrow(1, 3, 3),
                       doctest::Contains("narrow: range [3, 6) is outside dim 1 of size 5"), Error);
  CHECK_THROWS_WITH_AS(m.narrow(0, -1, 1), doctest::Contains("narrow: range [-1, 0)"), Error);
}

TEST_CASE("expand broadcasts with stride 0") {
  Tensor x = from_vector(std::vector<float>{1, 2, 3}, {3, 1});
  Tensor e = x.expand({2, 3, 4});
  CHECK(e.shape() == Shape{2, 3, 4});
  CHECK(e.strides() == Shape{0, 1, 0});
  CHECK(e.storage() == x.storage());
  CHECK(vals(e.slice(0, 1, 2)) == std::vector<float>{1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3});
  CHECK(x.expand({3, 1}).storage() == x.storage());
  CHECK_THROWS_WITH_AS(x.expand({3}), doctest::Contains("expand: cannot expand [3, 1] to fewer dims [3]"), Error);
  CHECK_THROWS_WITH_AS(x.expand({2, 4}), doctest::Contains("expand: cannot expand [3, 1] to [2, 4]"), Error);
}

TEST_CASE("views, broadcasting, cat and stack refuse shapes that overflow int64") {
  const int64_t big = int64_t{1} << 32, huge = int64_t{1} << 62;
  const int64_t max = std::numeric_limits<int64_t>::max();
  // Near the limit is fine to describe: a stride-0 view of 2^62 elements
  // allocates nothing.
  Tensor e = ops::full({}, 2.0).expand({huge / big, big});
  CHECK(e.numel() == huge);
  CHECK(e.strides() == Shape{0, 0});
  CHECK(e.narrow(1, big - 2, 2).slice(0, 0, 1).to_vector<float>() == std::vector<float>{2, 2});
  CHECK_THROWS_WITH_AS(ops::full({}, 2.0).expand({big, big}),
                       doctest::Contains("expand: shape [4294967296, 4294967296] has more elements than int64"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::zeros({3, 1}).expand({-2, 3, 1}),
                       doctest::Contains("expand: negative size in shape [-2, 3, 1]"), Error);
  // Broadcasting: two views of 2^32 elements whose broadcast has 2^64.
  Tensor col = ops::zeros({1, 1}).expand({big, 1}), row = ops::zeros({1, 1}).expand({1, big});
  CHECK_THROWS_WITH_AS(ops::add(col, row),
                       doctest::Contains("add: shape [4294967296, 4294967296] has more elements than int64"), Error);
  CHECK_THROWS_WITH_AS(broadcast_shapes({big, 1}, {1, big}, "myop"), doctest::Contains("myop: shape"), Error);
  // view/reshape: sizes whose product overflows, with or without -1.
  Tensor none = ops::zeros({0});
  CHECK_THROWS_WITH_AS(none.reshape({0, big, big}),
                       doctest::Contains("reshape: shape [0, 4294967296, 4294967296] has more elements"), Error);
  CHECK_THROWS_WITH_AS(none.view({-1, big, big}), doctest::Contains("view: shape"), Error);
  CHECK_THROWS_WITH_AS(e.reshape({big, big}), doctest::Contains("reshape: shape [4294967296, 4294967296] has more"),
                       Error);
  // narrow and slice with ranges or steps whose sums would overflow.
  Tensor m = iota({4, 5});
  CHECK_THROWS_WITH_AS(m.narrow(1, 3, max),
                       doctest::Contains("narrow: range [3, 3 + 9223372036854775807) is outside dim 1 of size 5"),
                       Error);
  CHECK(vals(m.slice(1, 0, 5, max)) == std::vector<float>{0, 5, 10, 15});
  CHECK(vals(m.slice(1, 2, max, max)) == std::vector<float>{2, 7, 12, 17});
  CHECK(vals(m.slice(0, std::numeric_limits<int64_t>::min(), max).slice(1, 4, max)) ==
        std::vector<float>{4, 9, 14, 19});
  // cat and stack: sizes along the joined dim that add up past int64, then
  // element counts that fit but byte counts that do not.
  Tensor half = ops::zeros({1, 1}).expand({huge, 1});
  CHECK_THROWS_WITH_AS(ops::cat({half, half}, 0),
                       doctest::Contains("cat: the sizes of dim 0 add up to more than int64 can count"), Error);
  Tensor quarter = ops::zeros({1, 1}).expand({huge / 2, 1});
  CHECK_THROWS_WITH_AS(ops::cat({quarter, quarter}, 0),
                       doctest::Contains("cat: shape [4611686018427387904, 1] of 4-byte elements needs more bytes"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::stack({half, half}, 0),
                       doctest::Contains("stack: shape [2, 4611686018427387904, 1] has more elements"), Error);
  CHECK_THROWS_WITH_AS(ops::split(m, {max, max, 7}, 1),
                       doctest::Contains("split: sizes [9223372036854775807, 9223372036854775807, 7] add up to "
                                         "more than int64 can count"),
                       Error);
}

TEST_CASE("squeeze and unsqueeze") {
  Tensor x = iota({2, 1, 3});
  CHECK(x.squeeze(1).shape() == Shape{2, 3});
  CHECK(x.squeeze(-2).shape() == Shape{2, 3});
  CHECK(x.squeeze(0).shape() == Shape{2, 1, 3});  // not of size 1: unchanged
  CHECK(x.unsqueeze(0).shape() == Shape{1, 2, 1, 3});
  CHECK(x.unsqueeze(3).shape() == Shape{2, 1, 3, 1});
  CHECK(x.unsqueeze(-1).shape() == Shape{2, 1, 3, 1});
  CHECK(x.unsqueeze(-4).shape() == Shape{1, 2, 1, 3});
  CHECK(x.unsqueeze(2).storage() == x.storage());
  CHECK(vals(x.transpose(0, 2).unsqueeze(1).contiguous()) == vals(x.transpose(0, 2).contiguous()));
  Tensor s = ops::full({}, 4.0);
  CHECK(s.unsqueeze(0).shape() == Shape{1});
  CHECK(s.unsqueeze(0).squeeze(0).shape() == Shape{});
  CHECK_THROWS_WITH_AS(x.unsqueeze(4), doctest::Contains("unsqueeze: dim 4 is out of range"), Error);
  CHECK_THROWS_WITH_AS(x.squeeze(3), doctest::Contains("squeeze: dim 3 is out of range"), Error);
}

TEST_CASE("contiguous, clone") {
  Tensor x = iota({3, 4});
  CHECK(x.contiguous().storage() == x.storage());
  Tensor t = x.transpose(0, 1);
  Tensor c = t.contiguous();
  CHECK(c.is_contiguous());
  CHECK(c.storage() != x.storage());
  CHECK(vals(c) == std::vector<float>{0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11});
  Tensor k = x.clone();
  CHECK(k.storage() != x.storage());
  ops::fill_(k, 1.0);
  CHECK(vals(x)[5] == 5.0f);
  Tensor ks = x.slice(1, 0, 4, 3).clone();
  CHECK(ks.is_contiguous());
  CHECK(vals(ks) == std::vector<float>{0, 3, 4, 7, 8, 11});
}

TEST_CASE("to(dtype) converts values and routes gradients back") {
  Tensor x = from_vector(std::vector<float>{1.5f, -2.75f, 1.00390625f, 3.9f}, {4});
  CHECK(x.to(DType::Float64).to_vector<double>() == std::vector<double>{1.5, -2.75, 1.00390625, double(3.9f)});
  // bfloat16 rounds to nearest even: 1 + 2^-8 is a tie -> 1.
  CHECK(x.to(DType::BFloat16).to_vector<float>() == std::vector<float>{1.5f, -2.75f, 1.0f, 3.90625f});
  CHECK(x.to(DType::Int32).to_vector<int32_t>() == std::vector<int32_t>{1, -2, 1, 3});  // truncation
  CHECK(x.to(DType::Float32).storage() == x.storage());
  Tensor i = from_vector(std::vector<int32_t>{7, -3}, {2});
  CHECK(i.to(DType::Float32).to_vector<float>() == std::vector<float>{7, -3});

  Tensor leaf = random_tensor({3}, {DType::Float32, Device::cpu(), true});
  ops::sum(ops::mul(leaf.to(DType::Float64), 3.0)).backward();
  CHECK(leaf.grad().dtype() == DType::Float32);
  CHECK(vals(leaf.grad()) == std::vector<float>{3, 3, 3});
  Tensor as_int = leaf.to(DType::Int32);
  CHECK_FALSE(as_int.requires_grad());
  Tensor g = random_tensor({2, 3}, kF64Grad);
  CHECK(gradcheck([](const std::vector<Tensor>& in) {
                    return ops::mul(in[0].to(DType::Float32).to(DType::Float64), in[0]);
                  },
                  {g}, {1e-3, 1e-4, 1e-4}));  // float32 rounding: a larger step
}

TEST_CASE("writes through views land in the base") {
  Tensor base = ops::zeros({4, 6});
  ops::fill_(base.slice(1, 1, 6, 2), 1.0);                  // strided columns 1, 3, 5
  ops::copy_(base.transpose(0, 1).narrow(1, 3, 1), iota({6, 1}));  // last row, via a transposed view
  ops::add_(base.narrow(0, 0, 2).slice(1, 0, 6, 3), ops::full({}, 10.0));
  ops::mul_(base.reshape({24}).slice(0, 12, 18), -1.0);     // row 2
  ops::fill_(base.unsqueeze(0).squeeze(0).permute({1, 0}).narrow(0, 0, 1).narrow(1, 1, 1), 7.0);
  CHECK(vals(base) == std::vector<float>{10, 1, 0, 11, 0, 1,   //
                                         7, 1, 0, 11, 0, 1,    //
                                         -0.0f, -1, -0.0f, -1, -0.0f, -1,
                                         0, 1, 2, 3, 4, 5});
  Tensor v = base.view({2, 12});
  CHECK(base.version() == v.version());
  uint64_t before = base.version();
  ops::zero_(v.slice(0, 1, 2));
  CHECK(base.version() == before + 1);
  CHECK(vals(base)[12] == 0.0f);
  CHECK(vals(base)[11] == 1.0f);
  // copy_ broadcasts and casts.
  Tensor d = ops::zeros({2, 3}, {DType::Float64});
  ops::copy_(d.transpose(0, 1), from_vector(std::vector<float>{1.5f, 2.5f}, {2}));
  CHECK(d.to_vector<double>() == std::vector<double>{1.5, 1.5, 1.5, 2.5, 2.5, 2.5});
}

TEST_CASE("gradchecks through views") {
  Tensor x = random_tensor({3, 4}, kF64Grad);
  Tensor xt = transposed_leaf({4, 6});
  auto check = [](auto fn, const Tensor& leaf) { CHECK(gradcheck(fn, {leaf})); };
  check([](const std::vector<Tensor>& in) { return ops::tanh(in[0].reshape({2, -1, 3})); }, x);
  check([](const std::vector<Tensor>& in) { return in[0].reshape({24}).slice(0, 1, 20, 3); }, xt);
  check([](const std::vector<Tensor>& in) { return ops::exp(in[0].view({2, 6}).transpose(0, 1)); }, x);
  check([](const std::vector<Tensor>& in) { return in[0].unsqueeze(0).permute({2, 0, 1}).contiguous(); }, xt);
  check([](const std::vector<Tensor>& in) { return in[0].slice(1, -4, 6, 2).slice(0, 1, 3); }, xt);
  check([](const std::vector<Tensor>& in) { return in[0].narrow(0, 1, 2).squeeze(0); }, x);
  check([](const std::vector<Tensor>& in) { return ops::mul(in[0].slice(1, 0, 1).expand({3, 5}), 2.0); }, x);
  check([](const std::vector<Tensor>& in) { return in[0].unsqueeze(1).expand({3, 2, 4}).clone(); }, x);
  check([](const std::vector<Tensor>& in) { return in[0].transpose(0, 1).reshape({-1}); }, xt);
  // A view used twice, overlapping slices of one leaf.
  check(
      [](const std::vector<Tensor>& in) {
        return ops::mul(in[0].slice(1, 0, 3), in[0].slice(1, 1, 4));
      },
      x);
}

TEST_CASE("to(device) round trip keeps values and gradients") {
  MINIDL_REQUIRE_CUDA();
  Tensor x = random_tensor({3, 5}, {DType::Float32, Device::cpu(), true});
  Tensor on_gpu = x.transpose(0, 1).to(Device::cuda());  // non-contiguous source
  CHECK(on_gpu.is_cuda());
  CHECK(on_gpu.device() == Device::cuda(0));
  check_close(on_gpu, x.transpose(0, 1), 0, 0);
  Tensor back = ops::mul(on_gpu, 2.0).to(Device::cpu());
  ops::sum(back).backward();
  CHECK(x.grad().device() == Device::cpu());
  CHECK(vals(x.grad()) == std::vector<float>(15, 2.0f));
  CHECK(on_gpu.to(Device::cuda()).storage() == on_gpu.storage());
}

TEST_CASE("strided copies on CUDA match the CPU (float32, bfloat16)") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    Tensor x = random_tensor({5, 6, 7}, {dtype});
    Tensor g = x.to(Device::cuda());
    auto views = [](const Tensor& t) {
      return std::vector<Tensor>{t.permute({2, 0, 1}), t.slice(2, 1, 7, 3).transpose(0, 1),
                                 t.slice(0, 4, 5).expand({3, 6, 7}), t.narrow(1, 2, 3).unsqueeze(1),
                                 t.transpose(0, 2).reshape({-1})};
    };
    std::vector<Tensor> cpu_views = views(x), gpu_views = views(g);
    for (size_t i = 0; i < cpu_views.size(); ++i) {
      CAPTURE(i);
      check_close(gpu_views[i].contiguous(), cpu_views[i].contiguous(), 0, 0);
      check_close(gpu_views[i].to(DType::Float64), cpu_views[i].to(DType::Float64), 0, 0);
    }
    // Writes through a strided CUDA view.
    Tensor base_cpu = ops::zeros({4, 6}, {dtype});
    Tensor base_gpu = ops::zeros({4, 6}, {dtype, Device::cuda()});
    Tensor src = random_tensor({3, 4}, {dtype});
    ops::copy_(base_cpu.slice(1, 0, 6, 2).transpose(0, 1), src);
    ops::copy_(base_gpu.slice(1, 0, 6, 2).transpose(0, 1), src.to(Device::cuda()));
    check_close(base_gpu, base_cpu, 0, 0);
  }
}

TEST_CASE("ops mixing CPU and CUDA tensors fail clearly") {
  MINIDL_REQUIRE_CUDA();
  Tensor a = random_tensor({3}, {DType::Float32});
  Tensor b = random_tensor({3}, {DType::Float32, Device::cuda()});
  CHECK_THROWS_WITH_AS(ops::add(a, b), doctest::Contains("add: inputs are on different devices (float32 [3] on "
                                                         "cpu vs float32 [3] on cuda:0)"),
                       Error);
  // copy_ moves between devices on purpose.
  Tensor c = ops::zeros({3}, {DType::Float32, Device::cuda()});
  ops::copy_(c, a);
  check_close(c, a, 0, 0);
}

TEST_CASE("zero-dimensional tensors: views that make sense work, the rest fail clearly") {
  Tensor s = ops::full({}, 3.0);
  CHECK(s.squeeze(0).shape() == Shape{});
  CHECK(s.transpose(0, 0).shape() == Shape{});
  CHECK(s.permute({}).shape() == Shape{});
  CHECK(s.reshape({1}).item<float>() == 3.0f);
  CHECK(s.expand({2, 2}).to_vector<float>() == std::vector<float>{3, 3, 3, 3});
  CHECK_THROWS_WITH_AS(s.slice(0, 0, 1), doctest::Contains("slice: cannot slice a zero-dimensional tensor"), Error);
  CHECK_THROWS_WITH_AS(s.narrow(0, 0, 1), doctest::Contains("narrow: cannot narrow a zero-dimensional tensor"),
                       Error);
  CHECK_THROWS_WITH_AS(s.size(0), doctest::Contains("size: dim 0 is out of range for a zero-dimensional tensor"),
                       Error);
  CHECK_THROWS_WITH_AS(s.stride(0), doctest::Contains("stride: dim 0 is out of range for a zero-dimensional tensor"),
                       Error);
  CHECK_THROWS_WITH_AS(s.squeeze(1), doctest::Contains("squeeze: dim 1 is out of range"), Error);
}
