// The tape: accumulation, grad mode, detach, seeds, freed graphs and the
// errors the design promises.
#include <string>

#include "autograd/tape.h"
#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64Grad{DType::Float64, Device::cpu(), true};

Tensor values(const std::vector<double>& v, bool requires_grad = false) {
  Tensor t = from_vector(v, {static_cast<int64_t>(v.size())});
  if (requires_grad) t.requires_grad_(true);
  return t;
}

std::vector<double> grad_of(const Tensor& t) { return t.grad().to_vector<double>(); }

}  // namespace

TEST_CASE("gradients accumulate over two backward passes until zero_grad") {
  Tensor x = values({1, -2, 3}, true);
  ops::sum(ops::mul(x, x)).backward();  // 2x
  CHECK(grad_of(x) == std::vector<double>{2, -4, 6});
  ops::sum(ops::mul(x, 3.0)).backward();  // + 3
  CHECK(grad_of(x) == std::vector<double>{5, -1, 9});
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
  ops::sum(x).backward();
  CHECK(grad_of(x) == std::vector<double>{1, 1, 1});
}

TEST_CASE("a tensor used twice gets the sum of both paths") {
  Tensor x = values({0.5, -1.5}, true);
  Tensor y = ops::add(ops::mul(x, x), ops::exp(x));  // dy/dx = 2x + exp(x)
  ops::sum(y).backward();
  std::vector<double> g = grad_of(x);
  CHECK(g[0] == doctest::Approx(1.0 + std::exp(0.5)).epsilon(1e-12));
  CHECK(g[1] == doctest::Approx(-3.0 + std::exp(-1.5)).epsilon(1e-12));
  Tensor a = random_tensor({3, 4}, kF64Grad);
  CHECK(gradcheck(
      [](const std::vector<Tensor>& in) {
        Tensor h = ops::tanh(in[0]);
        return ops::mul(ops::add(h, in[0]), ops::sigmoid(h));
      },
      {a}));
}

TEST_CASE("NoGradGuard records nothing and restores the previous mode") {
  Tensor x = values({1, 2}, true);
  autograd::clear_tape();
  CHECK(autograd::grad_enabled());
  {
    NoGradGuard outer;
    CHECK_FALSE(autograd::grad_enabled());
    Tensor y = ops::mul(x, 2.0);
    CHECK_FALSE(y.requires_grad());
    CHECK(autograd::tape_size() == 0);
    {
      NoGradGuard inner;
      CHECK_FALSE(autograd::grad_enabled());
    }
    CHECK_FALSE(autograd::grad_enabled());  // the inner guard restores "off", not "on"
    CHECK_THROWS_WITH_AS(ops::sum(y).backward(), doctest::Contains("does not require grad"), Error);
  }
  CHECK(autograd::grad_enabled());
  Tensor z = ops::mul(x, 2.0);
  CHECK(z.requires_grad());
  CHECK(autograd::tape_size() == 1);
  autograd::clear_tape();
}

TEST_CASE("ops on tensors that do not require grad record nothing") {
  autograd::clear_tape();
  Tensor a = random_tensor({3});
  Tensor y = ops::exp(ops::add(a, a));
  CHECK_FALSE(y.requires_grad());
  CHECK(autograd::tape_size() == 0);
}

TEST_CASE("detach shares storage and cuts the graph") {
  Tensor x = values({2, 3}, true);
  Tensor d = x.detach();
  CHECK(d.storage() == x.storage());
  CHECK_FALSE(d.requires_grad());
  CHECK(d.is_leaf());
  ops::sum(ops::mul(x, d)).backward();  // only the x factor is differentiated
  CHECK(grad_of(x) == std::vector<double>{2, 3});
  Tensor y = ops::exp(x);
  Tensor yd = y.detach();
  CHECK_FALSE(yd.requires_grad());
  CHECK(yd.to_vector<double>() == y.to_vector<double>());
  autograd::clear_tape();
}

TEST_CASE("requires_grad_ errors") {
  Tensor x = values({1}, true);
  Tensor y = ops::mul(x, 2.0);
  CHECK_THROWS_WITH_AS(y.requires_grad_(true), doctest::Contains("requires_grad_: only leaf tensors"), Error);
  CHECK_NOTHROW(y.detach().requires_grad_(true));
  CHECK_THROWS_WITH_AS(ops::zeros({2}, {DType::Int32}).requires_grad_(true),
                       doctest::Contains("requires_grad_: int32 tensors cannot require gradients"), Error);
  autograd::clear_tape();
}

TEST_CASE("backward with a seed gradient for non-scalar outputs") {
  Tensor x = random_tensor({2, 3}, kF64Grad);
  Tensor y = ops::mul(x, 3.0);
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("backward: tensor of shape [2, 3] is not a scalar"), Error);
  CHECK_THROWS_WITH_AS(y.backward(random_tensor({3, 2})),
                       doctest::Contains("backward: seed gradient shape [3, 2] differs from tensor shape [2, 3]"),
                       Error);
  // The closures read saved tensors in the gradient's dtype: another dtype is refused.
  CHECK_THROWS_WITH_AS(y.backward(random_tensor({2, 3}).to(DType::Float32)),
                       doctest::Contains("backward: seed gradient is float32 on cpu, the tensor float64 on cpu"),
                       Error);
  Tensor seed = random_tensor({2, 3});
  y.backward(seed);
  check_close(x.grad(), ops::mul(seed, 3.0), 1e-15, 0);
  // A leaf: its gradient is the seed.
  Tensor leaf = random_tensor({2}, kF64Grad);
  Tensor s = random_tensor({2});
  leaf.backward(s);
  CHECK(grad_of(leaf) == s.to_vector<double>());
  // A scalar seed for a scalar output scales the gradient.
  Tensor z = random_tensor({3}, kF64Grad);
  ops::sum(z).backward(ops::full({}, 2.5, {DType::Float64}));
  CHECK(grad_of(z) == std::vector<double>{2.5, 2.5, 2.5});
}

TEST_CASE("backward errors: no grad, undefined, twice through a freed graph") {
  CHECK_THROWS_WITH_AS(random_tensor({}).backward(), doctest::Contains("does not require grad"), Error);
  CHECK_THROWS_WITH_AS(Tensor().backward(), doctest::Contains("backward: called on an undefined tensor"),
                       Error);
  Tensor x = random_tensor({3}, kF64Grad);
  Tensor y = ops::sum(ops::exp(x));
  y.backward();
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("the graph of this tensor was freed"), Error);
}

TEST_CASE("the tape is freed after backward; clear_tape drops it") {
  autograd::clear_tape();
  Tensor x = random_tensor({4}, kF64Grad);
  Tensor y = ops::sum(ops::tanh(ops::mul(x, 2.0)));
  CHECK(autograd::tape_size() == 3);
  y.backward();
  CHECK(autograd::tape_size() == 0);

  Tensor h = ops::exp(x);
  Tensor loss = ops::sum(h);
  CHECK(autograd::tape_size() == 2);
  autograd::clear_tape();
  CHECK(autograd::tape_size() == 0);
  CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("clear_tape() was called"), Error);
  // Outputs of a freed tape act as constants in new computations.
  x.zero_grad();
  ops::sum(ops::mul(h, x)).backward();
  check_close(x.grad(), h, 1e-15, 0);  // d/dx sum(h x) with h constant = h
}

TEST_CASE("a failing backward (in-place change) leaves a clean tape") {
  Tensor x = random_tensor({3}, kF64Grad);
  Tensor w = random_tensor({3});
  Tensor y = ops::sum(ops::mul(x, w));
  ops::add_(w, ops::ones({3}, {DType::Float64}));
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("mul backward: a tensor of shape [3] saved for "
                                                       "backward was modified in place (version 0 -> 1)"),
                       Error);
  CHECK(autograd::tape_size() == 0);
  x.zero_grad();
  ops::sum(ops::mul(x, w)).backward();
  check_close(x.grad(), w, 0, 0);
}

TEST_CASE("leaf gradients are contiguous and never alias other tensors") {
  // add's backward hands the same gradient to both inputs; each leaf must get
  // its own, or an in-place update of one (e.g. gradient clipping) would
  // change the other.
  Tensor a = random_tensor({3}, kF64Grad);
  Tensor b = random_tensor({3}, kF64Grad);
  ops::sum(ops::add(a, b)).backward();
  CHECK(a.grad().storage() != b.grad().storage());
  ops::mul_(a.grad(), 2.0);
  CHECK(grad_of(b) == std::vector<double>{1, 1, 1});
  // A seed given by the caller is not adopted as a gradient either.
  Tensor leaf = random_tensor({2}, kF64Grad);
  Tensor seed = random_tensor({2});
  leaf.backward(seed);
  CHECK(leaf.grad().storage() != seed.storage());
  // The gradient of a transposed use is a permuted view of the upstream
  // gradient; the leaf gets it contiguous.
  Tensor w = random_tensor({2, 3}, kF64Grad);
  ops::sum(ops::mul(w.transpose(0, 1), random_tensor({3, 2}))).backward();
  CHECK(w.grad().is_contiguous());
}

TEST_CASE("gradients reaching a float32 leaf from float64 math are cast back") {
  Tensor x = random_tensor({3}, {DType::Float32, Device::cpu(), true});
  ops::sum(ops::mul(x.to(DType::Float64), 2.0)).backward();
  CHECK(x.grad().dtype() == DType::Float32);
  CHECK(x.grad().to_vector<float>() == std::vector<float>{2, 2, 2});
}

TEST_CASE("gradcheck reports the first mismatching element") {
  Tensor x = random_tensor({3}, kF64Grad);
  // exp's value with a gradient that is wrong on purpose: detach cuts half of x * x.
  auto wrong = [](const std::vector<Tensor>& in) { return ops::mul(in[0], in[0].detach()); };
  CHECK_THROWS_WITH_AS(gradcheck(wrong, {x}), doctest::Contains("gradcheck: input 0 (shape [3]) element 0"),
                       Error);
  CHECK_THROWS_WITH_AS(gradcheck(wrong, {random_tensor({3}, {DType::Float32, Device::cpu(), true})}),
                       doctest::Contains("gradcheck needs float64 CPU tensors"), Error);
}

TEST_CASE("post-accumulate-grad hooks: once per pass, with the final gradient, as soon as it is final") {
  Tensor a = values({1, 2}, true), b = values({3, -1}, true), unused = values({5}, true);
  std::vector<std::string> events;
  std::vector<std::vector<double>> seen_a;
  const uint64_t ha = autograd::register_post_accumulate_grad_hook(a, [&](const Tensor& leaf) {
    events.push_back("a");
    seen_a.push_back(leaf.grad().to_vector<double>());
  });
  const uint64_t hb = autograd::register_post_accumulate_grad_hook(b, [&](const Tensor&) { events.push_back("b"); });
  const uint64_t hu =
      autograd::register_post_accumulate_grad_hook(unused, [&](const Tensor&) { events.push_back("unused"); });
  // a is read twice (a * a and + a); b only by the last op of the forward, so
  // b's gradient is final first. A closure of a node that runs after b's is
  // final logs itself: the hook must have run before it.
  Tensor u = ops::add(ops::mul(a, a), a);  // da = 2a + 1
  Tensor marker = u.detach().clone();  // an identity op whose backward logs
  autograd::record("log", {u}, {marker}, [&](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    events.push_back("node before u");
    return {g[0]};
  });
  ops::sum(ops::mul(marker, b)).backward();  // db = u = a^2 + a, da = b (2a + 1)
  CHECK(events == std::vector<std::string>{"b", "node before u", "a"});
  REQUIRE(seen_a.size() == 1);
  CHECK(seen_a[0] == std::vector<double>{3 * 3, -1 * 5});
  // A second pass: the hooks run again, seeing the accumulated gradient.
  events.clear();
  ops::sum(ops::mul(a, 2.0)).backward();
  CHECK(events == std::vector<std::string>{"a"});
  CHECK(seen_a.back() == std::vector<double>{11, -3});
  // Removed: no longer called. A leaf that is itself the root runs its hooks.
  autograd::remove_post_accumulate_grad_hook(a, ha);
  events.clear();
  ops::sum(ops::mul(a, b)).backward();
  CHECK(events == std::vector<std::string>{"b"});
  b.backward(values({1, 1}));
  CHECK(events == std::vector<std::string>{"b", "b"});
  CHECK_THROWS_WITH_AS(autograd::register_post_accumulate_grad_hook(ops::mul(a, 2.0), [](const Tensor&) {}),
                       doctest::Contains("must be a leaf that requires grad"), Error);
  autograd::remove_post_accumulate_grad_hook(b, hb);
  autograd::remove_post_accumulate_grad_hook(unused, hu);
  CHECK(b.impl()->autograd.grad_hooks.empty());
}

TEST_CASE("post-accumulate-grad hooks that do not read gradients leave the pass's deferred work queued") {
  static const int key = 0;
  for (bool reads : {false, true}) {
    CAPTURE(reads);
    Tensor a = values({1, 2}, true), b = values({3, -1}, true), c = values({4}, true);
    bool queued = false, queued_after_flush = true;
    std::vector<double> a_grad;
    const uint64_t hook = autograd::register_post_accumulate_grad_hook(b, [&](const Tensor&) {
      queued = autograd::deferred(&key);
      autograd::flush_deferred();
      queued_after_flush = autograd::deferred(&key);
      a_grad = a.grad().to_vector<double>();
    }, reads);
    // Forward c, b, a: the pass finishes a's node (deferred), then b (hook), then c.
    Tensor w = ops::mul(c, 3.0), z1 = ops::mul(b, 2.0), z2 = minidl::testing::deferring_double(a, &key);
    ops::sum(ops::add(ops::add(z1, z2), ops::sum(w))).backward();
    CHECK(queued == !reads);  // a reading hook gets every gradient written first
    CHECK_FALSE(queued_after_flush);
    CHECK(a_grad == std::vector<double>{2, 2});
    CHECK(a.grad().to_vector<double>() == std::vector<double>{2, 2});
    CHECK(c.grad().to_vector<double>() == std::vector<double>{6});
    autograd::remove_post_accumulate_grad_hook(b, hook);
  }
  autograd::flush_deferred();  // outside a pass: nothing to do
}
