// ops::dropout_add_layer_norm (residual + dropout(h), then layer_norm) against
// dropout, add and layer_norm composed: the same values, gradients and
// dropout mask for the same generator state; float64 gradchecks; CPU-vs-CUDA
// parity over every kernel path; and the transformer blocks that use it.
#include <cmath>
#include <string>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 4242, kOffset = 17;

struct Inputs {
  Tensor h, residual, weight, bias;
};

// Fresh random inputs of `shape` (h and residual requiring grad; the
// parameters around 1 and 0, requiring grad when defined).
Inputs make_inputs(const Shape& shape, DType dtype, bool weight = true, bool bias = true) {
  TensorOptions o{dtype, Device::cpu(), true};
  Inputs in{ops::mul(random_tensor(shape, {dtype}), 2.0), random_tensor(shape, {dtype}), Tensor(), Tensor()};
  const int64_t c = shape.back();
  if (weight) in.weight = ops::add(ops::mul(random_tensor({c}, {dtype}), 0.5), 1.0);
  if (bias) in.bias = ops::mul(random_tensor({c}, {dtype}), 0.5);
  for (Tensor* t : {&in.h, &in.residual, &in.weight, &in.bias})
    if (t->defined()) t->requires_grad_(o.requires_grad);
  return in;
}

Inputs on(const Inputs& in, Device device) {
  auto move = [&](const Tensor& t) {
    if (!t.defined()) return Tensor();
    Tensor m = t.detach().to(device);
    m.requires_grad_(true);
    return m;
  };
  return {move(in.h), move(in.residual), move(in.weight), move(in.bias)};
}

using Fn = std::pair<Tensor, Tensor> (*)(const Inputs&, double p, bool training, Generator& gen);

std::pair<Tensor, Tensor> fused(const Inputs& in, double p, bool training, Generator& gen) {
  return ops::dropout_add_layer_norm(in.h, in.residual, in.weight, in.bias, p, training, &gen);
}

std::pair<Tensor, Tensor> composed(const Inputs& in, double p, bool training, Generator& gen) {
  Tensor sum = ops::add(in.residual, ops::dropout(in.h, p, training, &gen));
  return {sum, ops::layer_norm(sum, in.weight, in.bias)};
}

struct Result {
  Tensor sum, z, dh, dresidual, dweight, dbias;
  uint64_t offset_after;
};

// Runs fn from the generator state (kSeed, kOffset), then backward of
// sum(sum * seed_sum) + sum(z * seed_z); either seed may be undefined (that
// output unused).
Result run(Fn fn, const Inputs& in, double p, bool training, const Tensor& seed_sum, const Tensor& seed_z) {
  for (const Tensor& t : {in.h, in.residual, in.weight, in.bias})
    if (t.defined()) t.zero_grad();
  Generator gen(kSeed);
  gen.set_state(kSeed, kOffset);
  auto [sum, z] = fn(in, p, training, gen);
  Tensor loss;
  if (seed_sum.defined()) loss = ops::sum(ops::mul(sum, seed_sum));
  if (seed_z.defined()) {
    Tensor lz = ops::sum(ops::mul(z, seed_z));
    loss = loss.defined() ? ops::add(loss, lz) : lz;
  }
  loss.backward();
  auto grad = [](const Tensor& t) { return t.defined() ? t.grad() : Tensor(); };
  return {sum, z, grad(in.h), grad(in.residual), grad(in.weight), grad(in.bias), gen.offset()};
}

void check_same(const Tensor& a, const Tensor& b, double atol, double rtol, const std::string& what = "") {
  INFO(what);
  REQUIRE(a.defined() == b.defined());
  if (a.defined()) check_close(a, b, atol, rtol);
}

// param_atol: for dweight and dbias (sums over rows); grad_atol when negative.
void check_results(const Result& a, const Result& b, double atol, double rtol, double grad_atol, double grad_rtol,
                   double param_atol = -1) {
  if (param_atol < 0) param_atol = grad_atol;
  CHECK(a.offset_after == b.offset_after);
  check_same(a.sum, b.sum, atol, rtol, "sum");
  check_same(a.z, b.z, atol, rtol, "z");
  check_same(a.dh, b.dh, grad_atol, grad_rtol, "dh");
  check_same(a.dresidual, b.dresidual, grad_atol, grad_rtol, "dresidual");
  check_same(a.dweight, b.dweight, param_atol, grad_rtol, "dweight");
  check_same(a.dbias, b.dbias, param_atol, grad_rtol, "dbias");
}

// The fused CPU kernel against the ops composed: the same roundings, except
// that the compiler may fuse h * scale + residual into one multiply-add in
// float32/float64 (one rounding fewer); bfloat16 rounds h * scale to its own
// type first, so nothing can fuse and the results are bitwise equal.
void check_composed(const Result& a, const Result& b, DType dtype) {
  if (dtype == DType::BFloat16) check_results(a, b, 0, 0, 0, 0);
  else if (dtype == DType::Float32) check_results(a, b, 1e-5, 1e-5, 1e-4, 1e-4);
  else check_results(a, b, 1e-12, 1e-12, 1e-11, 1e-11);
}

}  // namespace

TEST_CASE("dropout_add_layer_norm equals dropout, add and layer_norm composed (CPU)") {
  for (DType dtype : {DType::Float64, DType::Float32, DType::BFloat16}) {
    for (Shape shape : {Shape{7, 33}, Shape{2, 5, 384}, Shape{3, 1027}}) {
      for (double p : {0.0, 0.2, 0.6}) {
        for (bool training : {true, false}) {
          CAPTURE(dtype);
          CAPTURE(shape_str(shape));
          CAPTURE(p);
          CAPTURE(training);
          Inputs in = make_inputs(shape, dtype);
          Tensor ss = random_tensor(shape, {dtype}), sz = random_tensor(shape, {dtype});
          check_composed(run(fused, in, p, training, ss, sz), run(composed, in, p, training, ss, sz), dtype);
        }
      }
    }
  }
}

TEST_CASE("dropout_add_layer_norm: partial affine, one output unused, inputs without grad") {
  const Shape shape{9, 40};
  Tensor ss = random_tensor(shape), sz = random_tensor(shape);
  for (auto [weight, bias] : {std::pair{true, false}, std::pair{false, true}, std::pair{false, false}}) {
    CAPTURE(weight);
    CAPTURE(bias);
    Inputs in = make_inputs(shape, DType::Float64, weight, bias);
    check_composed(run(fused, in, 0.3, true, ss, sz), run(composed, in, 0.3, true, ss, sz), DType::Float64);
  }
  Inputs in = make_inputs(shape, DType::Float64);
  // Only z used: the sum's own gradient arrives undefined (no zero fill).
  check_composed(run(fused, in, 0.3, true, Tensor(), sz), run(composed, in, 0.3, true, Tensor(), sz), DType::Float64);
  // Only the sum used: z's gradient is zero, so the parameter gradients are
  // zeros (the unfused layer_norm, off the path, leaves them undefined).
  Result only_sum = run(fused, in, 0.3, true, ss, Tensor()), ref = run(composed, in, 0.3, true, ss, Tensor());
  REQUIRE(!ref.dweight.defined());
  check_same(only_sum.dweight, ops::zeros({40}, {DType::Float64}), 0, 0);
  check_same(only_sum.dbias, ops::zeros({40}, {DType::Float64}), 0, 0);
  only_sum.dweight = only_sum.dbias = Tensor();
  check_composed(only_sum, ref, DType::Float64);
  // Only the parameters require grad: no row gradients are made.
  Inputs params = make_inputs(shape, DType::Float64);
  params.h = params.h.detach();
  params.residual = params.residual.detach();
  check_composed(run(fused, params, 0.3, true, ss, sz), run(composed, params, 0.3, true, ss, sz), DType::Float64);
  // Only h requires grad, without dropout: its gradient is d residual.
  Inputs h_only = make_inputs(shape, DType::Float64, false, false);
  h_only.residual = h_only.residual.detach();
  check_composed(run(fused, h_only, 0.0, true, ss, sz), run(composed, h_only, 0.0, true, ss, sz), DType::Float64);
}

TEST_CASE("dropout_add_layer_norm draws ops::dropout's mask from the generator's next offset") {
  const Shape shape{64, 96};
  const double p = 0.3;
  Tensor h = ops::add(random_tensor(shape), 2.0);  // in [1, 3): never zero
  Tensor residual = random_tensor(shape);
  Generator a(kSeed), b(kSeed);
  a.set_state(kSeed, kOffset);
  b.set_state(kSeed, kOffset);
  Tensor dropped = ops::dropout(h, p, true, &a);
  auto [sum, z] = ops::dropout_add_layer_norm(h, residual, Tensor(), Tensor(), p, true, &b);
  CHECK(a.offset() == kOffset + 1);
  CHECK(b.offset() == kOffset + 1);
  std::vector<double> d = dropped.to_vector<double>(), s = ops::sub(sum, residual).to_vector<double>();
  int64_t zeros = 0;
  for (size_t i = 0; i < d.size(); ++i) {
    CAPTURE(i);
    CHECK((d[i] == 0) == (std::abs(s[i]) < 1e-12));
    zeros += d[i] == 0;
  }
  CHECK(std::abs(static_cast<double>(zeros) / static_cast<double>(d.size()) - p) < 0.03);
  // Not training, or p == 0: the identity on h, and no offset reserved.
  ops::dropout_add_layer_norm(h, residual, Tensor(), Tensor(), p, false, &b);
  ops::dropout_add_layer_norm(h, residual, Tensor(), Tensor(), 0.0, true, &b);
  CHECK(b.offset() == kOffset + 1);
}

TEST_CASE("dropout_add_layer_norm gradcheck: affine or not, both outputs, non-contiguous inputs") {
  auto check = [](const Tensor& h, const Tensor& r, const Tensor& w, const Tensor& b, double p) {
    std::vector<Tensor> inputs{h, r};
    if (w.defined()) inputs.push_back(w);
    if (b.defined()) inputs.push_back(b);
    CHECK(gradcheck(
        [&](const std::vector<Tensor>& v) {
          Generator gen(77);  // the same mask on every evaluation
          auto [sum, z] = ops::dropout_add_layer_norm(v[0], v[1], w.defined() ? v[2] : Tensor(),
                                                      b.defined() ? v.back() : Tensor(), p, true, &gen);
          return ops::add(ops::mul(sum, 0.7), z);
        },
        inputs));
  };
  TensorOptions g{DType::Float64, Device::cpu(), true};
  check(random_tensor({4, 6}, g), random_tensor({4, 6}, g), random_tensor({6}, g), random_tensor({6}, g), 0.3);
  check(random_tensor({2, 3, 5}, g), random_tensor({2, 3, 5}, g), Tensor(), Tensor(), 0.5);
  check(random_tensor({3, 5}, g), random_tensor({3, 5}, g), random_tensor({5}, g), Tensor(), 0.0);
  Tensor ht = random_tensor({6, 4}).transpose(0, 1), rt = random_tensor({6, 4}).transpose(0, 1);
  ht.requires_grad_(true);
  rt.requires_grad_(true);
  check(ht, rt, Tensor(), random_tensor({6}, g), 0.25);
}

TEST_CASE("dropout_add_layer_norm errors") {
  Tensor x = random_tensor({3, 4});
  auto call = [](const Tensor& h, const Tensor& r, const Tensor& w, double p) {
    return ops::dropout_add_layer_norm(h, r, w, Tensor(), p, true);
  };
  CHECK_THROWS_WITH_AS(call(x, random_tensor({4, 3}), Tensor(), 0.1),
                       doctest::Contains("dropout_add_layer_norm: h must have the residual's shape"), Error);
  CHECK_THROWS_WITH_AS(call(x, x.to(DType::Float32), Tensor(), 0.1),
                       doctest::Contains("dropout_add_layer_norm: dtype mismatch"), Error);
  CHECK_THROWS_WITH_AS(call(x, x, random_tensor({3}), 0.1),
                       doctest::Contains("dropout_add_layer_norm: weight must have shape [4]"), Error);
  CHECK_THROWS_WITH_AS(call(x, x, Tensor(), 1.0), doctest::Contains("dropout_add_layer_norm: p must be in [0, 1)"),
                       Error);
  CHECK_THROWS_WITH_AS(call(Tensor(), x, Tensor(), 0.1),
                       doctest::Contains("dropout_add_layer_norm: h is an undefined tensor"), Error);
}

// ---- the transformer blocks ----

namespace {

nn::TransformerLMConfig block_config() {
  nn::TransformerLMConfig c;
  c.vocab_size = 7;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 6;
  c.dropout = 0.25;
  return c;
}

// The block as the ops one by one: x + attn(ln_1(x)), then + mlp(ln_2(.)),
// each layer applying its own dropout.
Tensor unfused_block(const nn::TransformerBlock& b, const Tensor& x) {
  Tensor h1 = ops::add(x, b.attn->forward(b.ln_1->forward(x)));
  return ops::add(h1, b.mlp->forward(b.ln_2->forward(h1)));
}

}  // namespace

TEST_CASE("TransformerBlock: fused forwards equal the unfused ops, masks and gradients included") {
  nn::TransformerLMConfig config = block_config();
  for (const char* attention : {"causal", "dilated"}) {
    CAPTURE(attention);
    config.attention = attention;
    if (config.attention == "dilated") config.attention_options = {{"segments", "2,4"}, {"dilations", "1,2"}};
    Generator init(5), drop(9);
    nn::TransformerBlock block(config, 0, init, &drop, {DType::Float64});
    nn::LayerNorm next(config.n_embd, true, {DType::Float64});
    {
      NoGradGuard no_grad;
      for (const Tensor& p : block.parameters()) ops::copy_(p, random_tensor(p.shape()));
      for (const Tensor& p : next.parameters()) ops::copy_(p, random_tensor(p.shape()));
    }
    Tensor x = random_tensor({2, 5, config.n_embd}, {DType::Float64, Device::cpu(), true});
    Tensor seed = random_tensor({2, 5, config.n_embd});
    // Runs f from the same dropout state; returns its output and every gradient.
    auto grads = [&](auto f) {
      block.zero_grad();
      next.zero_grad();
      x.zero_grad();
      drop.set_state(9, 3);
      Tensor y = f();
      ops::sum(ops::mul(y, seed)).backward();
      std::vector<Tensor> out{y.detach(), x.grad()};
      for (const Tensor& p : block.parameters()) out.push_back(p.grad());
      for (const Tensor& p : next.parameters()) out.push_back(p.grad().defined() ? p.grad() : Tensor());
      out.push_back(ops::full({}, static_cast<double>(drop.offset())));
      return out;
    };
    for (bool training : {true, false}) {
      CAPTURE(training);
      block.train(training);
      std::vector<Tensor> a = grads([&] { return block.forward(x); });
      std::vector<Tensor> b = grads([&] { return unfused_block(block, x); });
      REQUIRE(a.size() == b.size());
      for (size_t i = 0; i < a.size(); ++i) {
        CAPTURE(i);
        check_same(a[i], b[i], 1e-12, 1e-12);
      }
      // The stacked form, with the next LayerNorm fused in.
      std::vector<Tensor> c = grads([&] { return block.forward(x, block.ln_1->forward(x), next).second; });
      std::vector<Tensor> d = grads([&] { return next.forward(unfused_block(block, x)); });
      for (size_t i = 0; i < c.size(); ++i) {
        CAPTURE(i);
        check_same(c[i], d[i], 1e-12, 1e-12);
      }
    }
  }
}

// ---- CUDA ----

TEST_CASE("CUDA dropout_add_layer_norm: CPU parity and the same mask, float32 and bfloat16, every kernel path") {
  MINIDL_REQUIRE_CUDA();
  // Warp per row with 16-byte access (384, 20), scalar access (65, 250),
  // block per row with 16-byte (3000) or scalar (1027) access, and many rows
  // per warp in the parameter-gradient kernel (4099 x 384).
  const std::vector<Shape> shapes = {{37, 65}, {33, 384}, {19, 250}, {2, 3, 20}, {5, 3000}, {7, 1027}, {4099, 384}};
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Shape& shape : shapes) {
      for (double p : {0.0, 0.2}) {
        CAPTURE(dtype);
        CAPTURE(shape_str(shape));
        CAPTURE(p);
        Inputs cpu = make_inputs(shape, dtype), gpu = on(cpu, Device::cuda());
        Tensor ss = random_tensor(shape, {dtype}), sz = random_tensor(shape, {dtype});
        Result rc = run(fused, cpu, p, true, ss, sz);
        Result rg = run(fused, gpu, p, true, ss.to(Device::cuda()), sz.to(Device::cuda()));
        const bool bf16 = dtype == DType::BFloat16;
        const double rows = static_cast<double>(cpu.h.numel() / shape.back());
        // A bf16 sum may round the other way, one ulp; the parameter
        // gradients sum over rows, their error grows like sqrt(rows).
        check_results(rg, rc, bf16 ? 2e-2 : 1e-5, bf16 ? 1e-2 : 1e-5, bf16 ? 3e-2 : 1e-4, bf16 ? 2e-2 : 1e-4,
                      (bf16 ? 3e-2 : 1e-5) * std::sqrt(rows));
        // The same mask: exactly where ops::dropout on CUDA zeroes h, the
        // fused dh is zero (h and the upstream gradients are never zero).
        if (p > 0) {
          Generator gen(kSeed);
          gen.set_state(kSeed, kOffset);
          std::vector<double> kept = ops::dropout(ops::add(ops::mul(gpu.h.detach(), 0.0), 1.0), p, true, &gen)
                                         .to_vector<double>();
          std::vector<double> dh = rg.dh.to_vector<double>(), dhc = rc.dh.to_vector<double>();
          std::vector<double> dr = rg.dresidual.to_vector<double>(), drc = rc.dresidual.to_vector<double>();
          int64_t mismatches = 0;
          for (size_t i = 0; i < kept.size(); ++i) {
            // dh = mask * scale * d residual: where a bf16 d residual cancels to
            // exactly 0 (seen on an H200 for ~0.1% of elements) the mask cannot show.
            if (dr[i] == 0 || drc[i] == 0) continue;
            mismatches += (kept[i] == 0) != (dh[i] == 0) || (dh[i] == 0) != (dhc[i] == 0);
          }
          CHECK(mismatches == 0);
        }
      }
    }
  }
}

TEST_CASE("CUDA dropout_add_layer_norm equals the unfused CUDA ops") {
  MINIDL_REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (Shape shape : {Shape{64, 384}, Shape{6, 3000}}) {
      CAPTURE(dtype);
      CAPTURE(shape_str(shape));
      Inputs gpu = on(make_inputs(shape, dtype), Device::cuda());
      Tensor ss = random_tensor(shape, {dtype}).to(Device::cuda());
      Tensor sz = random_tensor(shape, {dtype}).to(Device::cuda());
      Result a = run(fused, gpu, 0.2, true, ss, sz), b = run(composed, gpu, 0.2, true, ss, sz);
      // The same kernels' arithmetic and roundings: the row values agree to
      // the last bit or nearly; the parameter sums may add in another order.
      const bool bf16 = dtype == DType::BFloat16;
      check_results(a, b, bf16 ? 1e-2 : 1e-6, bf16 ? 1e-2 : 1e-6, bf16 ? 2e-2 : 1e-5, bf16 ? 1e-2 : 1e-5);
    }
  }
}

TEST_CASE("CUDA dropout_add_layer_norm on rows that are not 16-byte aligned") {
  MINIDL_REQUIRE_CUDA();
  const int64_t rows = 21, cols = 200;
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    Tensor base_h = random_tensor({1 + rows * cols}, {dtype}), base_r = random_tensor({1 + rows * cols}, {dtype});
    auto view = [&](const Tensor& b) {
      Tensor v = b.slice(0, 1, 1 + rows * cols).view({rows, cols});
      v.requires_grad_(true);
      return v;
    };
    Inputs cpu{view(base_h), view(base_r), Tensor(), Tensor()};
    Inputs gpu{view(base_h.to(Device::cuda())), view(base_r.to(Device::cuda())), Tensor(), Tensor()};
    Tensor ss = random_tensor({rows, cols}, {dtype}), sz = random_tensor({rows, cols}, {dtype});
    Result rc = run(fused, cpu, 0.4, true, ss, sz);
    Result rg = run(fused, gpu, 0.4, true, ss.to(Device::cuda()), sz.to(Device::cuda()));
    const bool bf16 = dtype == DType::BFloat16;
    check_results(rg, rc, bf16 ? 2e-2 : 1e-5, bf16 ? 1e-2 : 1e-5, bf16 ? 3e-2 : 1e-4, bf16 ? 2e-2 : 1e-4);
  }
}
