// Optimizers, gradient clipping and learning-rate schedules against
// hand-computed values; the multi-tensor AdamW and clipping against a float64
// per-element reference, CPU against CUDA, and without host syncs.
#include <cmath>
#include <set>

#include "tests/helpers.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/runtime.h"
#endif

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64{DType::Float64, Device::cpu(), false};

Tensor param(const std::vector<double>& values, Device device = Device::cpu(),
             DType dtype = DType::Float64) {
  Tensor p = from_vector(values, {static_cast<int64_t>(values.size())}, {dtype, device, false});
  p.requires_grad_(true);
  return p;
}

void set_grad(const Tensor& p, const std::vector<double>& g) {
  p.set_grad(from_vector(g, p.shape(), p.options()));
}

// Scalar AdamW (PyTorch's algorithm), written out independently.
struct ScalarAdamW {
  double p, m = 0, v = 0;
  void step(double g, int t, double lr, double b1, double b2, double eps, double wd) {
    p -= lr * wd * p;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    double m_hat = m / (1 - std::pow(b1, t)), v_hat = v / (1 - std::pow(b2, t));
    p -= lr * m_hat / (std::sqrt(v_hat) + eps);
  }
};

nn::TransformerLMConfig tiny_config() {
  nn::TransformerLMConfig c;
  c.vocab_size = 7;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 4;
  return c;
}

}  // namespace

TEST_CASE("AdamW: first step moves each weight by lr against the gradient's sign") {
  Tensor p = param({1.0, -2.0});
  nn::AdamW opt(std::vector<Tensor>{p}, {.lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                                         .weight_decay = 0.0});
  set_grad(p, {0.5, -1.0});
  opt.step();
  // m_hat = g and v_hat = g^2, so the step is lr g / (|g| + eps).
  std::vector<double> v = p.to_vector<double>();
  CHECK(v[0] == doctest::Approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-14));
  CHECK(v[1] == doctest::Approx(-2.0 + 0.1 * 1.0 / (1.0 + 1e-8)).epsilon(1e-14));
  CHECK(opt.step_count() == 1);
  // State after one step: m = (1 - b1) g, v = (1 - b2) g^2.
  nn::StateDict sd = opt.state_dict();
  std::vector<double> m = sd.at("0.0.exp_avg").to_vector<double>();
  std::vector<double> s = sd.at("0.0.exp_avg_sq").to_vector<double>();
  CHECK(m[0] == doctest::Approx(0.05).epsilon(1e-14));
  CHECK(m[1] == doctest::Approx(-0.1).epsilon(1e-14));
  CHECK(s[0] == doctest::Approx(0.00025).epsilon(1e-12));
  CHECK(s[1] == doctest::Approx(0.001).epsilon(1e-12));
}

TEST_CASE("AdamW: three steps with decoupled weight decay match the scalar algorithm") {
  const double lr = 0.05, b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.1;
  Tensor decayed = param({1.5, -0.5, 2.0});
  Tensor plain = param({0.25, -3.0});
  nn::AdamW opt({{{decayed}, wd}, {{plain}, 0.0}},
                {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = 123.0});
  std::vector<ScalarAdamW> ref_d = {{1.5}, {-0.5}, {2.0}}, ref_p = {{0.25}, {-3.0}};
  const std::vector<std::vector<double>> grads_d = {{0.3, -0.2, 1.0}, {-0.1, 0.4, 0.5}, {0.2, 0.2, -2.0}};
  const std::vector<std::vector<double>> grads_p = {{1.0, 0.5}, {-2.0, 0.25}, {0.5, -0.5}};
  for (int t = 1; t <= 3; ++t) {
    set_grad(decayed, grads_d[t - 1]);
    set_grad(plain, grads_p[t - 1]);
    opt.step();
    for (size_t i = 0; i < 3; ++i) ref_d[i].step(grads_d[t - 1][i], t, lr, b1, b2, eps, wd);
    for (size_t i = 0; i < 2; ++i) ref_p[i].step(grads_p[t - 1][i], t, lr, b1, b2, eps, 0.0);
    std::vector<double> vd = decayed.to_vector<double>(), vp = plain.to_vector<double>();
    for (size_t i = 0; i < 3; ++i) CHECK(vd[i] == doctest::Approx(ref_d[i].p).epsilon(1e-13));
    for (size_t i = 0; i < 2; ++i) CHECK(vp[i] == doctest::Approx(ref_p[i].p).epsilon(1e-13));
  }
  // Spot check by hand, step 1 of the decayed weight 1.5 with g = 0.3:
  // 1.5 (1 - 0.05 * 0.1) - 0.05 * 0.3 / (0.3 + 1e-6).
  ScalarAdamW one{1.5};
  one.step(0.3, 1, lr, b1, b2, eps, wd);
  CHECK(one.p == doctest::Approx(1.5 * 0.995 - 0.05 * 0.3 / (0.3 + 1e-6)).epsilon(1e-14));
}

TEST_CASE("AdamW skips parameters without a gradient; zero_grad drops gradients") {
  Tensor a = param({1.0}), b = param({2.0});
  nn::AdamW opt(std::vector<Tensor>{a, b}, {.lr = 0.1, .weight_decay = 0.5});
  set_grad(a, {1.0});
  opt.step();
  CHECK(b.to_vector<double>()[0] == 2.0);  // no gradient: not even decayed
  CHECK(a.to_vector<double>()[0] != 1.0);
  opt.zero_grad();
  CHECK(!a.grad().defined());
}

TEST_CASE("SGD with momentum, nesterov, dampening and weight decay: hand-computed steps") {
  auto run = [](nn::SGDOptions options, int steps) {
    Tensor p = param({1.0});
    nn::SGD opt(std::vector<Tensor>{p}, options);
    std::vector<double> out;
    for (int i = 0; i < steps; ++i) {
      set_grad(p, {1.0});
      opt.step();
      out.push_back(p.to_vector<double>()[0]);
    }
    return out;
  };
  // buf: 1, 1.9, 2.71; p -= 0.1 buf.
  std::vector<double> momentum = run({.lr = 0.1, .momentum = 0.9}, 3);
  CHECK(momentum[0] == doctest::Approx(0.9).epsilon(1e-14));
  CHECK(momentum[1] == doctest::Approx(0.71).epsilon(1e-14));
  CHECK(momentum[2] == doctest::Approx(0.439).epsilon(1e-14));
  // Nesterov: g + 0.9 buf = 1.9, then 2.71.
  std::vector<double> nesterov = run({.lr = 0.1, .momentum = 0.9, .nesterov = true}, 2);
  CHECK(nesterov[0] == doctest::Approx(0.81).epsilon(1e-14));
  CHECK(nesterov[1] == doctest::Approx(0.539).epsilon(1e-14));
  // Dampening 0.5: buf = 1, then 0.9 + 0.5 = 1.4.
  std::vector<double> damped = run({.lr = 0.1, .momentum = 0.9, .dampening = 0.5}, 2);
  CHECK(damped[0] == doctest::Approx(0.9).epsilon(1e-14));
  CHECK(damped[1] == doctest::Approx(0.76).epsilon(1e-14));
  // L2 weight decay, no momentum: g = 1 + 0.5 p.
  std::vector<double> decay = run({.lr = 0.1, .weight_decay = 0.5}, 2);
  CHECK(decay[0] == doctest::Approx(0.85).epsilon(1e-14));
  CHECK(decay[1] == doctest::Approx(0.7075).epsilon(1e-14));
  CHECK_THROWS_WITH_AS(run({.lr = 0.1, .nesterov = true}, 1),
                       doctest::Contains("nesterov needs momentum > 0"), Error);
}

TEST_CASE("set_lr changes the next step") {
  Tensor p = param({1.0});
  nn::SGD opt(std::vector<Tensor>{p}, {.lr = 0.1});
  set_grad(p, {1.0});
  opt.set_lr(0.25);
  CHECK(opt.lr() == 0.25);
  opt.step();
  CHECK(p.to_vector<double>()[0] == doctest::Approx(0.75));
}

TEST_CASE("optimizer construction errors") {
  Tensor p = param({1.0});
  Tensor no_grad = from_vector(std::vector<double>{1.0}, {1});
  CHECK_THROWS_WITH_AS(nn::SGD(std::vector<Tensor>{no_grad}),
                       doctest::Contains("SGD: parameter 0 of group 0 must be a leaf tensor that requires grad"),
                       Error);
  CHECK_THROWS_WITH_AS(nn::AdamW(std::vector<nn::ParamGroup>{{{p}, 0.1}, {{p}, 0.0}}),
                       doctest::Contains("appears more than once"), Error);
  CHECK_THROWS_WITH_AS(nn::AdamW(std::vector<Tensor>{p}, {.beta1 = 1.0}),
                       doctest::Contains("AdamW: invalid options"), Error);
}

TEST_CASE("weight_decay_groups: decay only Linear weights") {
  nn::TransformerLMConfig config = tiny_config();
  config.tie_weights = false;
  nn::TransformerLM model(config);
  std::vector<nn::ParamGroup> groups = nn::weight_decay_groups(model, 0.1);
  REQUIRE(groups.size() == 2);
  CHECK(groups[0].weight_decay == 0.1);
  CHECK(groups[1].weight_decay == 0.0);
  std::set<const TensorImpl*> decayed;
  for (const Tensor& p : groups[0].params) decayed.insert(p.impl());
  std::set<std::string> decayed_names, kept_names;
  for (const auto& [name, p] : model.named_parameters())
    (decayed.count(p.impl()) ? decayed_names : kept_names).insert(name);
  CHECK(decayed_names == std::set<std::string>{
                             "h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight",
                             "h.0.mlp.c_proj.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_proj.weight",
                             "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "lm_head.weight"});
  CHECK(kept_names.count("wte.weight"));
  CHECK(kept_names.count("wpe.weight"));
  CHECK(kept_names.count("h.0.ln_1.weight"));
  CHECK(kept_names.count("h.1.mlp.c_fc.bias"));
  CHECK(kept_names.count("ln_f.bias"));
  CHECK(groups[0].params.size() + groups[1].params.size() == model.parameters().size());
  // The groups build an AdamW.
  nn::AdamW opt(groups, {.lr = 1e-3});
  CHECK(opt.param_groups().size() == 2);
}

TEST_CASE("optimizer state dict: resume reproduces the uninterrupted run") {
  auto make_grads = [](int t) { return std::vector<double>{0.1 * t, -0.3, 0.7 / t}; };
  Tensor a = param({1.0, 2.0, -1.0});
  nn::AdamW opt_a(std::vector<Tensor>{a}, {.lr = 0.01, .weight_decay = 0.1});
  for (int t = 1; t <= 2; ++t) {
    set_grad(a, make_grads(t));
    opt_a.step();
  }
  // Resume: fresh parameters and optimizer, loaded from copies of the state.
  Tensor b = param(a.to_vector<double>());
  nn::AdamW opt_b(std::vector<Tensor>{b}, {.lr = 0.01, .weight_decay = 0.1});
  nn::StateDict saved;
  for (const auto& [name, t] : opt_a.state_dict()) saved.insert(name, ops::clone(t));
  opt_b.load_state_dict(saved);
  CHECK(opt_b.step_count() == 2);
  set_grad(a, make_grads(3));
  set_grad(b, make_grads(3));
  opt_a.step();
  opt_b.step();
  CHECK(a.to_vector<double>() == b.to_vector<double>());

  nn::StateDict partial;
  partial.insert("0.0.exp_avg", ops::zeros({3}, kF64));
  partial.insert("0.0.exp_avg_sq", ops::zeros({4}, kF64));
  CHECK_THROWS_WITH_AS(opt_b.load_state_dict(partial),
                       doctest::Contains("'0.0.exp_avg_sq' has shape [4], expected [3], missing 'step'"),
                       Error);
}

TEST_CASE("clip_grad_norm_ returns the total norm and scales on device") {
  auto make = [](const std::vector<double>& g) {
    Tensor p = param(std::vector<double>(g.size(), 0.0), Device::cpu(), DType::Float32);
    set_grad(p, g);
    return p;
  };
  Tensor a = make({3, 4}), b = make({12}), none = param({5.0}, Device::cpu(), DType::Float32);
  Tensor norm = nn::clip_grad_norm_({a, b, none}, 6.5);
  CHECK(norm.dim() == 0);
  CHECK(norm.dtype() == DType::Float32);
  CHECK(norm.item<float>() == doctest::Approx(13.0).epsilon(1e-6));
  const double coef = 6.5 / (13.0 + 1e-6);
  std::vector<float> ga = a.grad().to_vector<float>(), gb = b.grad().to_vector<float>();
  CHECK(ga[0] == doctest::Approx(3 * coef).epsilon(1e-6));
  CHECK(ga[1] == doctest::Approx(4 * coef).epsilon(1e-6));
  CHECK(gb[0] == doctest::Approx(12 * coef).epsilon(1e-6));
  CHECK(!none.grad().defined());

  // Under the limit: untouched (coefficient exactly 1).
  Tensor c = make({0.5, -0.25});
  Tensor small = nn::clip_grad_norm_({c}, 1.0);
  CHECK(small.item<float>() == doctest::Approx(std::sqrt(0.3125)).epsilon(1e-6));
  CHECK(c.grad().to_vector<float>() == std::vector<float>{0.5f, -0.25f});

  // float64 gradients give a float64 norm.
  Tensor d = param({0.0, 0.0});
  set_grad(d, {6.0, 8.0});
  Tensor n64 = nn::clip_grad_norm_({d}, 5.0);
  CHECK(n64.dtype() == DType::Float64);
  CHECK(n64.item<double>() == doctest::Approx(10.0).epsilon(1e-12));
  CHECK(d.grad().to_vector<double>()[1] == doctest::Approx(8.0 * 5.0 / (10.0 + 1e-6)).epsilon(1e-12));
  CHECK_THROWS_WITH_AS(nn::clip_grad_norm_({d}, 0.0), doctest::Contains("max_norm must be positive"),
                       Error);
}

TEST_CASE("AdamW and clip_grad_norm_ on CUDA match the CPU (float32)") {
  MINIDL_REQUIRE_CUDA();
  std::vector<double> init = {0.5, -1.0, 2.0, 0.25}, g1 = {3.0, -1.0, 0.5, 2.0}, g2 = {-0.5, 0.25, 1.0, -4.0};
  Tensor cpu = param(init, Device::cpu(), DType::Float32);
  Tensor gpu = param(init, Device::cuda(), DType::Float32);
  nn::AdamW opt_cpu(std::vector<Tensor>{cpu}, {.lr = 0.1, .weight_decay = 0.1});
  nn::AdamW opt_gpu(std::vector<Tensor>{gpu}, {.lr = 0.1, .weight_decay = 0.1});
  for (const auto& g : {g1, g2}) {
    set_grad(cpu, g);
    set_grad(gpu, g);
    Tensor n_cpu = nn::clip_grad_norm_({cpu}, 1.0);
    Tensor n_gpu = nn::clip_grad_norm_({gpu}, 1.0);
    CHECK(n_gpu.is_cuda());
    check_close(n_gpu, n_cpu, 1e-6, 1e-6);
    opt_cpu.step();
    opt_gpu.step();
  }
  check_close(gpu, cpu, 1e-6, 1e-6);
}

namespace {

// A leaf on `device` holding `values` (made on the CPU, so CPU and CUDA
// copies start equal).
Tensor leaf_like(const Tensor& values, Device device) {
  Tensor p = values.to(device).clone();
  p.requires_grad_(true);
  return p;
}

// Odd sizes: non-multiples of 4, one element, and more than one 8192-element
// chunk of the CUDA kernels.
const std::vector<int64_t> kOddSizes = {1, 3, 7, 13, 8193, 20001};

// Several AdamW steps with a changing lr over float32 parameters in two
// groups — decayed with float32 gradients, not decayed with bfloat16
// gradients and bfloat16 compute copies — against ScalarAdamW in float64.
void check_adamw_against_reference(Device device) {
  const double b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.1;
  std::vector<Tensor> decayed, plain, copies;
  std::vector<std::vector<ScalarAdamW>> ref;
  for (size_t i = 0; i < kOddSizes.size(); ++i) {
    Tensor init = random_tensor({kOddSizes[i]}, {DType::Float32});
    (i % 2 ? plain : decayed).push_back(leaf_like(init, device));
    std::vector<ScalarAdamW> r;
    for (double v : init.to_vector<double>()) r.push_back({v});
    ref.push_back(std::move(r));
  }
  for (const Tensor& p : plain) copies.push_back(ops::to(p.detach(), DType::BFloat16));
  nn::AdamW opt({{decayed, wd}, {plain, 0.0}}, {.lr = 0.05, .beta1 = b1, .beta2 = b2, .eps = eps});
  opt.set_compute_copies(plain, copies);
  const double lrs[] = {0.05, 0.02, 0.1};
  for (int t = 1; t <= 3; ++t) {
    opt.set_lr(lrs[t - 1]);
    std::vector<std::vector<double>> grads;
    for (size_t i = 0; i < kOddSizes.size(); ++i) {
      const bool bf16 = i % 2;
      Tensor g = random_tensor({kOddSizes[i]}, {bf16 ? DType::BFloat16 : DType::Float32});
      (bf16 ? plain : decayed)[i / 2].set_grad(g.to(device));
      grads.push_back(g.to_vector<double>());  // the values the optimizer sees
    }
    opt.step();
    for (size_t i = 0; i < kOddSizes.size(); ++i)
      for (size_t k = 0; k < ref[i].size(); ++k)
        ref[i][k].step(grads[i][k], t, lrs[t - 1], b1, b2, eps, i % 2 ? 0.0 : wd);
  }
  CHECK(opt.step_count() == 3);
  CHECK(opt.step_tensor().item<double>() == 3.0);
  for (size_t i = 0; i < kOddSizes.size(); ++i) {
    INFO("parameter ", i, " of ", kOddSizes[i], " elements");
    const Tensor& p = (i % 2 ? plain : decayed)[i / 2];
    std::vector<double> want;
    for (const ScalarAdamW& r : ref[i]) want.push_back(r.p);
    check_close(p, from_vector(want, p.shape()), 2e-6, 2e-6);
  }
  // The compute copies are exactly the masters rounded to bfloat16.
  for (size_t i = 0; i < plain.size(); ++i)
    CHECK(copies[i].to_vector<float>() == ops::to(plain[i].detach(), DType::BFloat16).to_vector<float>());
}

// clip_grad_norm_ over odd sizes with float32 and bfloat16 gradients against
// the norm and scaling computed in float64.
void check_clip_against_reference(Device device) {
  std::vector<Tensor> params;
  double sum = 0;
  std::vector<std::vector<double>> before;
  for (size_t i = 0; i < kOddSizes.size(); ++i) {
    Tensor p = leaf_like(ops::zeros({kOddSizes[i]}), device);
    Tensor g = random_tensor({kOddSizes[i]}, {i % 2 ? DType::BFloat16 : DType::Float32});
    p.set_grad(g.to(device));
    before.push_back(g.to_vector<double>());
    for (double v : before.back()) sum += v * v;
    params.push_back(p);
  }
  const double norm = std::sqrt(sum), max_norm = 2.5;
  const double coef = max_norm / (norm + 1e-6);
  REQUIRE(coef < 1);
  Tensor got = nn::clip_grad_norm_(params, max_norm);
  CHECK(got.device() == device);
  CHECK(got.dtype() == DType::Float32);
  CHECK(got.item<float>() == doctest::Approx(norm).epsilon(1e-5));
  for (size_t i = 0; i < params.size(); ++i) {
    INFO("gradient ", i);
    std::vector<double> want;
    for (double v : before[i]) want.push_back(v * coef);
    // bfloat16 gradients are rounded after scaling: half an ulp, up to 2^-8.
    const double tol = i % 2 ? 4e-3 : 1e-5;
    check_close(params[i].grad(), from_vector(want, params[i].shape()), 1e-6, tol);
  }
}

}  // namespace

TEST_CASE("multi-tensor AdamW: fp32 and bf16 gradients, odd sizes, bf16 copies, against float64 (CPU)") {
  check_adamw_against_reference(Device::cpu());
}

TEST_CASE("multi-tensor AdamW: fp32 and bf16 gradients, odd sizes, bf16 copies, against float64 (CUDA)") {
  MINIDL_REQUIRE_CUDA();
  check_adamw_against_reference(Device::cuda());
}

TEST_CASE("multi-tensor clip_grad_norm_: fp32 and bf16 gradients, odd sizes, against float64 (CPU)") {
  check_clip_against_reference(Device::cpu());
}

TEST_CASE("multi-tensor clip_grad_norm_: fp32 and bf16 gradients, odd sizes, against float64 (CUDA)") {
  MINIDL_REQUIRE_CUDA();
  check_clip_against_reference(Device::cuda());
}

// Runs body(device) on the CPU and, when there is one, on a CUDA device,
// with a float64 parameter [1, -2] there.
template <class Body>
void on_cpu_and_cuda(Body body) {
  for (Device device : {Device::cpu(), Device::cuda()}) {
    if (device.is_cuda() && !cuda_is_available()) {
      MESSAGE("skipped the CUDA half: no CUDA device");
      continue;
    }
    CAPTURE(device);
    body(device, leaf_like(from_vector(std::vector<double>{1.0, -2.0}, {2}), device));
  }
}

TEST_CASE("AdamW reads lr and the step counter from device memory") {
  on_cpu_and_cuda([](Device device, Tensor p) {
    nn::AdamW opt(std::vector<Tensor>{p}, {.lr = 0.1, .weight_decay = 0.0});
    CHECK(opt.lr_tensor().device() == device);
    CHECK(opt.lr_tensor().item<double>() == 0.1);
    p.set_grad(from_vector(std::vector<double>{0.5, -1.0}, {2}, {DType::Float64, device}));
    // Written behind the host's back, as a graph replay would see it: the
    // kernel uses the tensor, not the host copy of lr.
    {
      NoGradGuard no_grad;
      ops::fill_(opt.lr_tensor(), 0.0);
    }
    opt.step();
    CHECK(p.to_vector<double>() == std::vector<double>{1.0, -2.0});
    // The bias corrections follow the device counter: with step = 9 before
    // the update, t = 10.
    {
      NoGradGuard no_grad;
      ops::fill_(opt.lr_tensor(), 0.1);
      ops::fill_(opt.step_tensor(), 9.0);
    }
    opt.step();
    CHECK(opt.step_tensor().item<double>() == 10.0);
    ScalarAdamW r{1.0};
    r.m = 0.1 * 0.5;  // after the first (lr 0) step
    r.v = 0.001 * 0.25;
    r.step(0.5, 10, 0.1, 0.9, 0.999, 1e-8, 0.0);
    CHECK(p.to_vector<double>()[0] == doctest::Approx(r.p).epsilon(1e-12));
  });
}

TEST_CASE("SGD reads lr and the step counter from device memory; momentum's first step follows the counter") {
  on_cpu_and_cuda([](Device device, Tensor p) {
    nn::SGD opt(std::vector<Tensor>{p}, {.lr = 0.1, .momentum = 0.9});
    p.set_grad(from_vector(std::vector<double>{0.5, -1.0}, {2}, {DType::Float64, device}));
    // Written behind the host's back, as a graph replay would see it.
    {
      NoGradGuard no_grad;
      ops::fill_(opt.lr_tensor(), 0.0);
    }
    opt.step();  // buf = g, lr 0
    CHECK(p.to_vector<double>() == std::vector<double>{1.0, -2.0});
    CHECK(opt.step_tensor().item<double>() == 1.0);
    // The counter back at 0: the next step is a first step again (buf = g,
    // not 0.9 buf + g), at lr 0.1.
    {
      NoGradGuard no_grad;
      ops::fill_(opt.lr_tensor(), 0.1);
      ops::fill_(opt.step_tensor(), 0.0);
    }
    opt.step();
    CHECK(opt.step_tensor().item<double>() == 1.0);
    std::vector<double> got = p.to_vector<double>();
    CHECK(got[0] == doctest::Approx(0.95).epsilon(1e-14));
    CHECK(got[1] == doctest::Approx(-1.9).epsilon(1e-14));
    opt.step();  // buf = 0.9 g + g
    got = p.to_vector<double>();
    CHECK(opt.step_tensor().item<double>() == 2.0);
    CHECK(got[0] == doctest::Approx(0.95 - 0.1 * 1.9 * 0.5).epsilon(1e-14));
    CHECK(got[1] == doctest::Approx(-1.9 + 0.1 * 1.9).epsilon(1e-14));
  });
}

TEST_CASE("multi-tensor AdamW and clipping on CUDA match the CPU: 200 tensors, mixed dtypes") {
  MINIDL_REQUIRE_CUDA();
  // More tensors than one launch's table holds (192), chunk-crossing sizes,
  // float32 params with float32 or bfloat16 gradients, bfloat16 params.
  std::vector<Tensor> cpu, gpu, cpu_copies, gpu_copies, cpu_f32, gpu_f32;
  for (int i = 0; i < 200; ++i) {
    const int64_t n = i % 50 == 0 ? 2 * 8192 + 5 : (i * 37) % 101 + 1;
    const DType dtype = i % 7 == 3 ? DType::BFloat16 : DType::Float32;
    Tensor init = random_tensor({n}, {dtype});
    cpu.push_back(leaf_like(init, Device::cpu()));
    gpu.push_back(leaf_like(init, Device::cuda()));
    if (dtype == DType::Float32) {
      cpu_f32.push_back(cpu.back());
      gpu_f32.push_back(gpu.back());
      cpu_copies.push_back(ops::to(init, DType::BFloat16));
      gpu_copies.push_back(ops::to(init, DType::BFloat16).to(Device::cuda()));
    }
  }
  nn::AdamW opt_cpu(std::vector<Tensor>(cpu), {.lr = 0.01, .weight_decay = 0.1});
  nn::AdamW opt_gpu(std::vector<Tensor>(gpu), {.lr = 0.01, .weight_decay = 0.1});
  opt_cpu.set_compute_copies(cpu_f32, cpu_copies);
  opt_gpu.set_compute_copies(gpu_f32, gpu_copies);
  for (int t = 0; t < 3; ++t) {
    for (size_t i = 0; i < cpu.size(); ++i) {
      const DType gd = cpu[i].dtype() == DType::BFloat16 || i % 2 ? DType::BFloat16 : DType::Float32;
      Tensor g = random_tensor(cpu[i].shape(), {gd});
      cpu[i].set_grad(g);
      gpu[i].set_grad(g.to(Device::cuda()));
    }
    // Clipping on the first step, not on the others (the untouched path).
    const double max_norm = t == 0 ? 1.0 : 1e9;
    Tensor n_cpu = nn::clip_grad_norm_(cpu, max_norm), n_gpu = nn::clip_grad_norm_(gpu, max_norm);
    CHECK(n_gpu.is_cuda());
    check_close(n_gpu, n_cpu, 1e-5, 1e-5);
    if (t == 1) {  // not clipped: gradients untouched, bit for bit
      CHECK(gpu[1].grad().to_vector<float>() == cpu[1].grad().to_vector<float>());
      CHECK(gpu[2].grad().to_vector<float>() == cpu[2].grad().to_vector<float>());
    }
    opt_cpu.set_lr(0.01 * (t + 1));
    opt_gpu.set_lr(0.01 * (t + 1));
    opt_cpu.step();
    opt_gpu.step();
  }
  for (size_t i = 0; i < cpu.size(); ++i) {
    INFO("parameter ", i, " (", cpu[i].dtype(), ")");
    // bfloat16 params may round one ulp apart (2^-8 relative).
    const double tol = cpu[i].dtype() == DType::BFloat16 ? 8e-3 : 1e-5;
    check_close(gpu[i], cpu[i], tol, tol);
  }
  for (size_t i = 0; i < gpu_copies.size(); ++i)
    CHECK(gpu_copies[i].to_vector<float>() ==
          ops::to(gpu_f32[i].detach(), DType::BFloat16).to_vector<float>());
  // Deterministic: the same gradients give the same norm, bit for bit.
  Tensor again = nn::clip_grad_norm_(gpu, 1e9);
  CHECK(again.item<float>() == nn::clip_grad_norm_(gpu, 1e9).item<float>());
}

#if defined(MINIDL_WITH_CUDA)
TEST_CASE("clip_grad_norm_ + AdamW step on CUDA: no host synchronisation") {
  MINIDL_REQUIRE_CUDA();
  std::vector<Tensor> params, copies;
  for (int64_t n : kOddSizes) {
    params.push_back(leaf_like(random_tensor({n}, {DType::Float32}), Device::cuda()));
    copies.push_back(ops::to(params.back().detach(), DType::BFloat16));
    params.back().set_grad(random_tensor({n}, {DType::BFloat16}).to(Device::cuda()));
  }
  nn::AdamW opt(std::vector<Tensor>(params), {.lr = 0.01});
  opt.set_compute_copies(params, copies);
  nn::clip_grad_norm_(params, 1.0);  // warm-up: allocator cache, lazy init
  opt.step();
  const uint64_t before = cuda::host_sync_count();
  for (int step = 0; step < 3; ++step) {
    opt.set_lr(0.01 / (step + 1));
    Tensor norm = nn::clip_grad_norm_(params, 1.0);
    opt.step();
  }
  CHECK(cuda::host_sync_count() == before);
  // The counter does see a sync: reading a value back waits once. The
  // device step counter advanced once per step (the update kernel's last
  // block stores it).
  CHECK(opt.step_tensor().item<double>() == 4);
  CHECK(cuda::host_sync_count() == before + 1);
}
#endif

TEST_CASE("WarmupCosineLR: warmup, peak, midpoint and floor") {
  nn::WarmupCosineLR s(1e-3, 1e-4, 10, 110);
  CHECK(s.lr_at(0) == doctest::Approx(1e-3 * 1 / 11));
  CHECK(s.lr_at(9) == doctest::Approx(1e-3 * 10 / 11));
  CHECK(s.lr_at(10) == doctest::Approx(1e-3));  // peak
  CHECK(s.lr_at(60) == doctest::Approx(5.5e-4));  // half way: (max + min) / 2
  CHECK(s.lr_at(35) == doctest::Approx(1e-4 + 0.5 * (1 + std::cos(M_PI * 0.25)) * 9e-4));
  CHECK(s.lr_at(110) == doctest::Approx(1e-4));  // end
  CHECK(s.lr_at(5000) == doctest::Approx(1e-4));
  for (int64_t t = 10; t < 110; ++t) CHECK(s.lr_at(t + 1) <= s.lr_at(t));

  nn::WarmupCosineLR no_warmup(1.0, 0.0, 0, 4);
  CHECK(no_warmup.lr_at(0) == doctest::Approx(1.0));
  CHECK(no_warmup.lr_at(2) == doctest::Approx(0.5));
  CHECK(no_warmup.lr_at(4) == doctest::Approx(0.0));

  nn::ConstantLR c(3e-4);
  CHECK(c.lr_at(0) == 3e-4);
  CHECK(c.lr_at(100000) == 3e-4);
  CHECK_THROWS_WITH_AS(nn::WarmupCosineLR(1e-3, 1e-2, 0, 10), doctest::Contains("min_lr <= max_lr"), Error);
  CHECK_THROWS_WITH_AS(nn::WarmupCosineLR(1e-3, 1e-4, 20, 10),
                       doctest::Contains("warmup_steps <= decay_steps"), Error);
}
