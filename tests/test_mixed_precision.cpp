// nn::MixedPrecision: the bfloat16 compute model stays the masters rounded to
// bfloat16 through training, and training through it equals the hand-written
// recipe it replaces (gradients cast to float32, per-step refresh casts).
#include "tests/helpers.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/runtime.h"
#endif

using namespace minidl;

namespace {

nn::TransformerLMConfig tiny_config() {
  nn::TransformerLMConfig c;
  c.vocab_size = 11;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 16;
  c.block_size = 8;
  c.dropout = 0.1;  // the compute model's dropout stream must not matter to the comparison
  return c;
}

// A fixed random batch (B = 3, T = 8) of token ids and next-token targets.
std::pair<Tensor, Tensor> batch(Device device, int seed) {
  std::vector<int32_t> x, y;
  for (int i = 0; i < 24; ++i) {
    x.push_back((i * 7 + seed * 3) % 11);
    y.push_back((i * 5 + seed) % 11);
  }
  return {from_vector(x, {3, 8}).to(device), from_vector(y, {3, 8}).to(device)};
}

Tensor loss_of(const nn::TransformerLM& model, const Tensor& x, const Tensor& y) {
  Tensor logits = ops::to(model.forward(x), DType::Float32);
  const int64_t n = x.numel();
  return ops::cross_entropy(logits.reshape({n, logits.size(-1)}), y.reshape({n}));
}

// Every compute parameter and buffer equals its master rounded to bfloat16.
void check_consistent(const nn::MixedPrecision& mp) {
  const nn::StateDict masters = mp.master().state_dict(), compute = mp.compute().state_dict();
  REQUIRE(masters.keys() == compute.keys());
  for (const auto& [name, m] : masters) {
    INFO("tensor ", name);
    const Tensor& c = compute.at(name);
    CHECK(c.device() == m.device());
    if (m.dtype() != DType::Float32) continue;
    CHECK(c.dtype() == DType::BFloat16);
    CHECK(c.to_vector<float>() == ops::to(m, DType::BFloat16).to_vector<float>());
  }
}

// Trains `steps` steps through MixedPrecision and, side by side, through the
// hand-written recipe (separate models, float32 gradient casts, refresh by
// copy_); the masters and losses must agree bit for bit.
void check_against_manual_recipe(Device device, int steps) {
  const nn::TransformerLMConfig config = tiny_config();
  auto master = std::make_shared<nn::TransformerLM>(config, 5);
  master->to(device);
  auto compute = std::make_shared<nn::TransformerLM>(config, 5);
  nn::MixedPrecision mp(master, compute);
  CHECK(compute->parameters()[0].dtype() == DType::BFloat16);
  CHECK(compute->parameters()[0].device() == device);
  check_consistent(mp);
  nn::AdamW opt(nn::weight_decay_groups(mp.master(), 0.1), {.lr = 3e-3});
  mp.attach(opt);

  nn::TransformerLM ref_master(config, 5), ref_compute(config, 5);
  ref_master.to(device);
  ref_compute.to(device);
  ref_compute.to(DType::BFloat16);
  const std::vector<Tensor> ref_params = ref_master.parameters(), ref_copies = ref_compute.parameters();
  nn::AdamW ref_opt(nn::weight_decay_groups(ref_master, 0.1), {.lr = 3e-3});

  for (int t = 0; t < steps; ++t) {
    auto [x, y] = batch(device, t);
    opt.set_lr(3e-3 / (t + 1));
    ref_opt.set_lr(3e-3 / (t + 1));

    Tensor loss = loss_of(*compute, x, y);
    opt.zero_grad();
    loss.backward();
    mp.gradients_to_masters();
    for (const Tensor& p : mp.parameters()) {
      REQUIRE(p.grad().defined());
      CHECK(p.grad().dtype() == DType::BFloat16);  // handed over, not cast
    }
    for (const Tensor& p : compute->parameters()) CHECK(!p.grad().defined());
    opt.step();
    check_consistent(mp);

    {
      NoGradGuard no_grad;
      for (size_t i = 0; i < ref_params.size(); ++i) ops::copy_(ref_copies[i], ref_params[i]);
    }
    Tensor ref_loss = loss_of(ref_compute, x, y);
    ref_opt.zero_grad();
    ref_loss.backward();
    {
      NoGradGuard no_grad;
      for (size_t i = 0; i < ref_params.size(); ++i)
        ref_params[i].set_grad(ops::to(ref_copies[i].grad(), DType::Float32));
      ref_compute.zero_grad();
    }
    ref_opt.step();
    CHECK(loss.item<float>() == ref_loss.item<float>());
  }
  const std::vector<Tensor> masters = mp.parameters();
  for (size_t i = 0; i < masters.size(); ++i) {
    // On the GPU the fused AdamW instantiated for bf16 and for fp32 gradients
    // may contract its arithmetic differently: equal to rounding there (the
    // worst seen on an H200: 1e-9 absolute on weights of 1e-4).
    if (device.is_cuda()) minidl::testing::check_close(masters[i], ref_params[i], 1e-8, 1e-5);
    else CHECK(masters[i].to_vector<float>() == ref_params[i].to_vector<float>());
  }
}

}  // namespace

TEST_CASE("MixedPrecision: consistent copies, equal to the hand-written recipe (CPU)") {
  check_against_manual_recipe(Device::cpu(), 3);
}

TEST_CASE("MixedPrecision: consistent copies, equal to the hand-written recipe (CUDA)") {
  MINIDL_REQUIRE_CUDA();
  check_against_manual_recipe(Device::cuda(), 3);
}

TEST_CASE("MixedPrecision: clipping the bf16 gradients, gradient accumulation, sync_compute") {
  const nn::TransformerLMConfig config = tiny_config();
  auto master = std::make_shared<nn::TransformerLM>(config, 1);
  auto compute = std::make_shared<nn::TransformerLM>(config, 1);
  nn::MixedPrecision mp(master, compute);
  compute->eval();  // the same gradient from each pass

  // Two backward passes accumulate on the compute model, then move.
  auto [x, y] = batch(Device::cpu(), 0);
  loss_of(*compute, x, y).backward();
  Tensor once = ops::clone(compute->parameters()[1].grad());
  loss_of(*compute, x, y).backward();
  mp.gradients_to_masters();
  const Tensor& p1 = mp.parameters()[1];
  testing::check_close(p1.grad(), ops::mul(once, 2.0), 0, 1e-2);
  // A master that already has a gradient accumulates the next one (in its dtype).
  loss_of(*compute, x, y).backward();
  Tensor before = ops::clone(p1.grad());
  mp.gradients_to_masters();
  CHECK(p1.grad().dtype() == DType::BFloat16);
  testing::check_close(p1.grad(), ops::mul(before, 1.5), 0, 2e-2);

  // clip_grad_norm_ on the masters clips the bf16 gradients in place.
  Tensor norm = nn::clip_grad_norm_(mp.parameters(), 1e-3);
  CHECK(norm.dtype() == DType::Float32);
  double sum = 0;
  for (const Tensor& p : mp.parameters())
    for (double v : p.grad().to_vector<double>()) sum += v * v;
  CHECK(std::sqrt(sum) == doctest::Approx(1e-3).epsilon(1e-2));

  // An SGD step (not fused) writes the copies too.
  nn::SGD sgd(mp.parameters(), {.lr = 0.1});
  mp.attach(sgd);
  sgd.step();
  check_consistent(mp);

  // Loading the masters, then sync_compute.
  nn::TransformerLM other(config, 99);
  mp.master().load_state_dict(other.state_dict());
  mp.sync_compute();
  check_consistent(mp);
}

TEST_CASE("MixedPrecision: errors") {
  nn::TransformerLMConfig config = tiny_config();
  auto master = std::make_shared<nn::TransformerLM>(config, 1);
  nn::TransformerLMConfig wider = config;
  wider.n_embd = 32;
  CHECK_THROWS_WITH_AS(nn::MixedPrecision(master, std::make_shared<nn::TransformerLM>(wider, 1)),
                       doctest::Contains("in the compute model; pass two instances of one architecture"),
                       Error);
  CHECK_THROWS_WITH_AS(nn::MixedPrecision(master, master), doctest::Contains("two distinct modules"), Error);
  auto bf16 = std::make_shared<nn::TransformerLM>(config, 1);
  bf16->to(DType::BFloat16);
  CHECK_THROWS_WITH_AS(nn::MixedPrecision(bf16, std::make_shared<nn::TransformerLM>(config, 1)),
                       doctest::Contains("the masters must be float32"), Error);
  // attach: the optimizer must hold the masters.
  nn::MixedPrecision mp(master, std::make_shared<nn::TransformerLM>(config, 1));
  Tensor stranger = ops::zeros({2});
  stranger.requires_grad_(true);
  nn::AdamW opt(std::vector<Tensor>{stranger});
  CHECK_THROWS_WITH_AS(mp.attach(opt), doctest::Contains("is not one of this optimizer's parameters"), Error);
}

#if defined(MINIDL_WITH_CUDA)
TEST_CASE("MixedPrecision step on CUDA: no host synchronisation") {
  MINIDL_REQUIRE_CUDA();
  const nn::TransformerLMConfig config = tiny_config();
  auto master = std::make_shared<nn::TransformerLM>(config, 2);
  master->to(Device::cuda());
  auto compute = std::make_shared<nn::TransformerLM>(config, 2);
  nn::MixedPrecision mp(master, compute);
  nn::AdamW opt(nn::weight_decay_groups(mp.master(), 0.1), {.lr = 1e-3});
  mp.attach(opt);
  auto [x, y] = batch(Device::cuda(), 0);
  Tensor loss = loss_of(*compute, x, y);  // warm-up
  loss.backward();
  mp.gradients_to_masters();
  nn::clip_grad_norm_(mp.parameters(), 1.0);
  opt.step();
  opt.zero_grad();
  loss_of(*compute, x, y).backward();
  const uint64_t before = cuda::host_sync_count();
  mp.gradients_to_masters();
  nn::clip_grad_norm_(mp.parameters(), 1.0);
  opt.set_lr(5e-4);
  opt.step();
  CHECK(cuda::host_sync_count() == before);
  check_consistent(mp);
}
#endif
