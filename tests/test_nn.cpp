// nn::Module and the layers: registration and naming, train/eval, device and
// dtype moves, state dicts, and float64 gradchecks of every layer.
#include <algorithm>
#include <cmath>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_causal;
using minidl::testing::check_close;
using minidl::testing::check_module_grads;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64{DType::Float64, Device::cpu(), false};

TensorOptions grad_f64() { return {DType::Float64, Device::cpu(), true}; }

nn::TransformerLMConfig tiny_config() {
  nn::TransformerLMConfig c;
  c.vocab_size = 5;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 6;
  return c;
}

// A trivial attention layer for registry tests: a learned scale of x.
class ScaleAttention : public nn::AttentionLayer {
 public:
  explicit ScaleAttention(const nn::AttentionInit& init) : AttentionLayer("ScaleAttention") {
    scale = register_parameter("scale", ops::full({1}, 0.5, init.options));
  }
  Tensor forward(const Tensor& x) override { return ops::mul(x, scale); }
  Tensor scale;
};

}  // namespace

// ---- Module ----

TEST_CASE("module registration: dotted names in registration order, dedup, counts") {
  Generator gen(1);
  nn::Module root("Root");
  auto a = root.register_module("a", std::make_shared<nn::Linear>(3, 4, true, gen));
  Tensor extra = root.register_parameter("extra", ops::zeros({2}));
  auto b = root.register_module("b", std::make_shared<nn::LayerNorm>(4));
  root.register_buffer("counter", ops::zeros({1}, {DType::Int32}));

  std::vector<std::string> names;
  for (const auto& [name, p] : root.named_parameters()) names.push_back(name);
  // Own parameters first, then children depth first.
  CHECK(names == std::vector<std::string>{"extra", "a.weight", "a.bias", "b.weight", "b.bias"});
  CHECK(root.num_parameters() == 2 + 12 + 4 + 4 + 4);
  CHECK(root.parameters(false).size() == 1);
  CHECK(root.children().size() == 2);
  CHECK(root.named_buffers().size() == 1);
  CHECK(root.named_buffers()[0].first == "counter");
  for (const Tensor& p : root.parameters()) {
    CHECK(p.requires_grad());
    CHECK(p.is_leaf());
  }
  CHECK(!root.buffers()[0].requires_grad());
  // The handles the layers keep are the registered tensors.
  CHECK(root.named_parameters()[1].second.impl() == a->weight.impl());

  // A tensor registered twice is listed once (under its first name).
  nn::Module shared("Shared");
  Tensor w = ops::zeros({2, 2});
  shared.register_parameter("w1", w);
  shared.register_parameter("w2", w);
  CHECK(shared.parameters().size() == 1);
  CHECK(shared.num_parameters() == 4);
  CHECK(shared.state_dict().size() == 2);

  std::vector<std::string> modules;
  for (const auto& [name, m] : root.named_modules()) modules.push_back(name + ":" + m->type_name());
  CHECK(modules == std::vector<std::string>{":Root", "a:Linear", "b:LayerNorm"});
}

TEST_CASE("module registration errors") {
  nn::Module m("Thing");
  m.register_parameter("w", ops::zeros({2}));
  CHECK_THROWS_WITH_AS(m.register_parameter("w", ops::zeros({2})),
                       doctest::Contains("Thing: cannot register parameter 'w'"), Error);
  CHECK_THROWS_WITH_AS(m.register_buffer("w", ops::zeros({2})), doctest::Contains("already used"),
                       Error);
  CHECK_THROWS_WITH_AS(m.register_parameter("a.b", ops::zeros({2})),
                       doctest::Contains("contain no '.'"), Error);
  CHECK_THROWS_WITH_AS(m.register_module("child", std::shared_ptr<nn::Module>()),
                       doctest::Contains("submodule 'child' is null"), Error);
  Tensor leaf = ops::zeros({2}, {DType::Float32, Device::cpu(), true});
  Tensor produced = ops::mul(leaf, 2.0);
  CHECK_THROWS_WITH_AS(m.register_parameter("p", produced), doctest::Contains("register a leaf"), Error);
}

TEST_CASE("train/eval propagate to every descendant") {
  nn::TransformerLM model(tiny_config());
  CHECK(model.is_training());
  model.eval();
  for (const auto& [name, m] : model.named_modules()) CHECK(!m->is_training());
  model.train();
  for (const auto& [name, m] : model.named_modules()) CHECK(m->is_training());
  model.h[1]->eval();
  CHECK(model.is_training());
  CHECK(!model.h[1]->mlp->drop->is_training());
  CHECK(model.h[0]->mlp->drop->is_training());
}

TEST_CASE("Dropout follows the training flag and its generator") {
  Generator g1(7), g2(7);
  nn::Dropout d1(0.5, &g1), d2(0.5, &g2);
  Tensor x = ops::ones({1000});
  Tensor y1 = d1.forward(x), y2 = d2.forward(x);
  CHECK(y1.to_vector<float>() == y2.to_vector<float>());  // same seed, same mask
  std::vector<float> v = y1.to_vector<float>();
  int zeros = 0;
  for (float e : v) {
    CHECK((e == 0.0f || e == 2.0f));
    zeros += e == 0.0f;
  }
  CHECK(zeros > 400);
  CHECK(zeros < 600);
  d1.eval();
  CHECK(d1.forward(x).to_vector<float>() == x.to_vector<float>());
  CHECK_THROWS_WITH_AS(nn::Dropout(1.0), doctest::Contains("p must be in [0, 1)"), Error);
}

TEST_CASE("to(DType) casts in place: handles stay valid, leaves keep requires_grad") {
  Generator gen(3);
  nn::Linear lin(4, 3, true, gen);
  Tensor w = lin.weight;
  std::vector<float> before = w.to_vector<float>();
  w.set_grad(ops::ones({3, 4}));
  lin.to(DType::Float64);
  CHECK(w.dtype() == DType::Float64);  // the same handle sees the cast
  CHECK(lin.weight.impl() == w.impl());
  CHECK(w.requires_grad());
  CHECK(w.is_leaf());
  CHECK(w.grad().dtype() == DType::Float64);
  std::vector<double> after = w.to_vector<double>();
  for (size_t i = 0; i < before.size(); ++i) CHECK(after[i] == static_cast<double>(before[i]));
  CHECK_THROWS_WITH_AS(lin.to(DType::Int32), doctest::Contains("floating dtype"), Error);
}

TEST_CASE("to(Device) moves parameters in place to CUDA and back") {
  MINIDL_REQUIRE_CUDA();
  nn::TransformerLMConfig config = tiny_config();
  config.n_embd = 64;  // head dim 32: the CUDA attention kernels take 32, 64 or 128
  nn::TransformerLM model(config, 11);
  nn::TransformerLM reference(config, 11);
  Tensor wte = model.wte->weight;
  model.to(Device::cuda());
  CHECK(wte.is_cuda());
  CHECK(model.wte->weight.impl() == wte.impl());
  for (const Tensor& p : model.parameters()) {
    CHECK(p.is_cuda());
    CHECK(p.requires_grad());
    CHECK(p.is_leaf());
  }
  // Same parameters: the CUDA forward matches the CPU one (TF32 matmuls).
  Tensor idx = from_vector(std::vector<int32_t>{0, 1, 2, 3, 4, 0, 4, 3, 2, 1, 0, 1}, {2, 6});
  Tensor cpu_logits = reference.forward(idx);
  Tensor cuda_logits = model.forward(idx.to(Device::cuda()));
  CHECK(cuda_logits.is_cuda());
  check_close(cuda_logits, cpu_logits, 2e-3, 2e-3);
  // Backward on CUDA fills CUDA gradients of the same leaves.
  model.loss(idx.to(Device::cuda()), idx.to(Device::cuda())).backward();
  CHECK(wte.grad().defined());
  CHECK(wte.grad().is_cuda());
  model.to(Device::cpu());
  CHECK(wte.device().is_cpu());
  CHECK(wte.grad().device().is_cpu());
  check_close(model.forward(idx), cpu_logits, 1e-6, 1e-6);
}

TEST_CASE("zero_grad drops every gradient") {
  nn::TransformerLM model(tiny_config());
  Tensor idx = from_vector(std::vector<int32_t>{0, 1, 2, 3}, {1, 4});
  model.loss(idx, idx).backward();
  for (const Tensor& p : model.parameters()) CHECK(p.grad().defined());
  model.zero_grad();
  for (const Tensor& p : model.parameters()) CHECK(!p.grad().defined());
}

// ---- state dicts ----

TEST_CASE("state_dict round trip reproduces the model") {
  nn::TransformerLMConfig config = tiny_config();
  nn::TransformerLM a(config, 1), b(config, 2);
  Tensor idx = from_vector(std::vector<int32_t>{0, 1, 2, 3, 4, 3}, {1, 6});
  CHECK(a.forward(idx).to_vector<float>() != b.forward(idx).to_vector<float>());
  nn::StateDict sd = a.state_dict();
  CHECK(sd.size() == a.parameters().size());
  CHECK(sd.keys().front() == "wte.weight");
  CHECK(sd.contains("h.1.attn.c_attn.weight"));
  CHECK(sd.contains("h.0.mlp.c_proj.bias"));
  CHECK(sd.keys().back() == "ln_f.bias");
  Tensor b_wte = b.wte->weight;
  nn::LoadStateDictResult r = b.load_state_dict(sd);
  CHECK(r.missing_keys.empty());
  CHECK(r.unexpected_keys.empty());
  CHECK(b.wte->weight.impl() == b_wte.impl());  // copied into, not replaced
  CHECK(a.forward(idx).to_vector<float>() == b.forward(idx).to_vector<float>());
}

TEST_CASE("load_state_dict errors name missing, unexpected and mismatched tensors") {
  Generator gen(1);
  nn::Linear lin(3, 2, true, gen);
  nn::StateDict missing;
  missing.insert("weight", ops::zeros({2, 3}));
  CHECK_THROWS_WITH_AS(lin.load_state_dict(missing), doctest::Contains("missing keys (1): bias"), Error);

  nn::StateDict unexpected;
  unexpected.insert("weight", ops::zeros({2, 3}));
  unexpected.insert("bias", ops::zeros({2}));
  unexpected.insert("scale", ops::zeros({2}));
  CHECK_THROWS_WITH_AS(lin.load_state_dict(unexpected), doctest::Contains("unexpected keys (1): scale"),
                       Error);

  nn::StateDict bad_shape;
  bad_shape.insert("weight", ops::zeros({3, 2}));
  bad_shape.insert("bias", ops::zeros({2}));
  CHECK_THROWS_WITH_AS(lin.load_state_dict(bad_shape),
                       doctest::Contains("'weight': expected float32 [2, 3] on cpu, got float32 [3, 2]"),
                       Error);

  nn::StateDict bad_dtype;
  bad_dtype.insert("weight", ops::zeros({2, 3}, kF64));
  bad_dtype.insert("bias", ops::zeros({2}));
  CHECK_THROWS_WITH_AS(lin.load_state_dict(bad_dtype),
                       doctest::Contains("'weight': expected float32 [2, 3] on cpu, got float64 [2, 3]"),
                       Error);
  // A failed load changes nothing.
  CHECK(lin.weight.to_vector<float>() != std::vector<float>(6, 0.0f));

  // Non-strict: loads what matches, reports the rest; mismatches still throw.
  nn::LoadStateDictResult r = lin.load_state_dict(unexpected, false);
  CHECK(r.unexpected_keys == std::vector<std::string>{"scale"});
  CHECK(lin.weight.to_vector<float>() == std::vector<float>(6, 0.0f));
  r = lin.load_state_dict(missing, false);
  CHECK(r.missing_keys == std::vector<std::string>{"bias"});
  CHECK_THROWS_WITH_AS(lin.load_state_dict(bad_shape, false), doctest::Contains("shape/dtype mismatches"),
                       Error);
}

// ---- layers: values and shapes ----

TEST_CASE("Linear computes x W^T + b; init is N(0, 0.02) with zero bias") {
  Generator gen(5);
  nn::Linear lin(2, 3, true, gen);
  CHECK(lin.weight.shape() == Shape{3, 2});
  CHECK(lin.bias.to_vector<float>() == std::vector<float>{0, 0, 0});
  {
    NoGradGuard no_grad;
    ops::copy_(lin.weight, from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {3, 2}));
    ops::copy_(lin.bias, from_vector(std::vector<float>{0.5f, -1, 2}, {3}));
  }
  Tensor x = from_vector(std::vector<float>{1, -1, 2, 0.5f}, {2, 1, 2});  // (2, 1, 2)
  Tensor y = lin.forward(x);
  CHECK(y.shape() == Shape{2, 1, 3});
  // [1,-1]: (1-2, 3-4, 5-6) + b; [2, .5]: (2+1, 6+2, 10+3) + b
  CHECK(y.to_vector<float>() == std::vector<float>{-0.5f, -2, 1, 3.5f, 7, 15});
  CHECK_THROWS_WITH_AS(lin.forward(ops::zeros({2, 3})),
                       doctest::Contains("Linear: input [2, 3] does not end in in_features 2"), Error);

  nn::Linear big(256, 256, false, gen);
  CHECK(!big.bias.defined());
  CHECK(big.parameters().size() == 1);
  std::vector<float> w = big.weight.to_vector<float>();
  double sum = 0, sq = 0;
  for (float v : w) {
    sum += v;
    sq += double(v) * v;
  }
  double mean = sum / w.size(), std = std::sqrt(sq / w.size() - mean * mean);
  CHECK(std::abs(mean) < 1e-3);
  CHECK(std == doctest::Approx(0.02).epsilon(0.03));
}

TEST_CASE("Embedding, LayerNorm and MLP shapes and defaults") {
  Generator gen(9);
  nn::Embedding emb(10, 4, gen);
  Tensor idx = from_vector(std::vector<int32_t>{3, 3, 9}, {3});
  Tensor e = emb.forward(idx);
  CHECK(e.shape() == Shape{3, 4});
  std::vector<float> ev = e.to_vector<float>(), wv = emb.weight.to_vector<float>();
  for (int c = 0; c < 4; ++c) {
    CHECK(ev[c] == wv[3 * 4 + c]);
    CHECK(ev[8 + c] == wv[9 * 4 + c]);
  }

  nn::LayerNorm ln(4);
  CHECK(ln.weight.to_vector<float>() == std::vector<float>{1, 1, 1, 1});
  CHECK(ln.eps == 1e-5);
  Tensor y = ln.forward(from_vector(std::vector<float>{1, 2, 3, 4}, {1, 4}));
  // (x - 2.5) / sqrt(1.25 + 1e-5)
  std::vector<float> yv = y.to_vector<float>();
  CHECK(yv[0] == doctest::Approx(-1.5 / std::sqrt(1.25 + 1e-5)).epsilon(1e-5));
  CHECK(yv[3] == doctest::Approx(1.5 / std::sqrt(1.25 + 1e-5)).epsilon(1e-5));
  nn::LayerNorm no_bias(4, false);
  CHECK(!no_bias.bias.defined());

  nn::MLP mlp(6, true, 0.0, gen);
  CHECK(mlp.c_fc->weight.shape() == Shape{24, 6});
  CHECK(mlp.c_proj->weight.shape() == Shape{6, 24});
  CHECK(mlp.forward(ops::ones({2, 3, 6})).shape() == Shape{2, 3, 6});
}

// ---- layers: float64 gradchecks ----

TEST_CASE("gradcheck Linear (with and without bias, batched input)") {
  Generator gen(21);
  nn::Linear lin(3, 4, true, gen, kF64);
  Tensor x = random_tensor({2, 2, 3}, grad_f64());
  check_module_grads(lin, x, [&] { return lin.forward(x); });
  nn::Linear no_bias(3, 2, false, gen, kF64);
  check_module_grads(no_bias, x, [&] { return no_bias.forward(x); });
  // 1-D and non-contiguous (transposed) inputs.
  Tensor v = random_tensor({3}, grad_f64());
  CHECK(lin.forward(v).shape() == Shape{4});
  check_module_grads(lin, v, [&] { return lin.forward(v); });
  Tensor base = random_tensor({3, 2, 2}, grad_f64());
  check_module_grads(lin, base, [&] { return lin.forward(base.permute({1, 2, 0})); });
}

TEST_CASE("gradcheck Embedding (repeated indices accumulate)") {
  Generator gen(22);
  nn::Embedding emb(5, 3, gen, kF64);
  Tensor idx = from_vector(std::vector<int32_t>{0, 4, 4, 2, 0, 1}, {2, 3});
  check_module_grads(emb, Tensor(), [&] { return emb.forward(idx); });
}

TEST_CASE("gradcheck LayerNorm") {
  nn::LayerNorm ln(5, true, kF64);
  {
    // Non-trivial affine parameters.
    NoGradGuard no_grad;
    ops::copy_(ln.weight, random_tensor({5}));
    ops::copy_(ln.bias, random_tensor({5}));
  }
  Tensor x = random_tensor({3, 5}, grad_f64());
  check_module_grads(ln, x, [&] { return ln.forward(x); });
}

TEST_CASE("gradcheck MLP") {
  Generator gen(23);
  nn::MLP mlp(4, true, 0.0, gen, nullptr, kF64, 0.3);
  Tensor x = random_tensor({2, 3, 4}, grad_f64());
  check_module_grads(mlp, x, [&] { return mlp.forward(x); });
}

TEST_CASE("gradcheck CausalSelfAttention") {
  Generator gen(24);
  // Larger init than 0.02 so the attention weights are far from uniform.
  nn::CausalSelfAttention attn(8, 2, true, 0.0, gen, nullptr, kF64, 0.3);
  {
    NoGradGuard no_grad;
    ops::mul_(attn.c_attn->weight, 20.0);
  }
  Tensor x = random_tensor({2, 5, 8}, grad_f64());
  Tensor y = attn.forward(x);
  CHECK(y.shape() == Shape{2, 5, 8});
  check_module_grads(attn, x, [&] { return attn.forward(x); });
}

TEST_CASE("CausalSelfAttention is causal: later tokens do not change earlier outputs") {
  Generator gen(25);
  nn::CausalSelfAttention attn(8, 2, true, 0.0, gen, nullptr, kF64, 0.3);
  check_causal(attn, 5, 8, 1e-12);
}

TEST_CASE("gradcheck TransformerBlock") {
  nn::TransformerLMConfig config = tiny_config();
  config.n_embd = 4;
  Generator gen(26);
  nn::TransformerBlock block(config, 0, gen, nullptr, kF64);
  {
    NoGradGuard no_grad;
    for (const Tensor& p : block.parameters()) ops::copy_(p, random_tensor(p.shape()));
  }
  Tensor x = random_tensor({2, 3, 4}, grad_f64());
  check_module_grads(block, x, [&] { return block.forward(x); });
}

TEST_CASE("gradcheck TransformerLM loss through tied embeddings") {
  nn::TransformerLMConfig config = tiny_config();
  config.n_layer = 1;
  config.n_embd = 4;
  config.block_size = 4;
  nn::TransformerLM model(config, 3, kF64);
  CHECK(model.lm_head == nullptr);
  {
    NoGradGuard no_grad;
    for (const Tensor& p : model.parameters()) ops::copy_(p, random_tensor(p.shape()));
  }
  Tensor idx = from_vector(std::vector<int32_t>{0, 1, 2, 3, 4, 4, 2, 1}, {2, 4});
  Tensor targets = from_vector(std::vector<int32_t>{1, 2, 3, 4, 4, 2, 1, 0}, {2, 4});
  check_module_grads(model, Tensor(), [&] { return model.loss(idx, targets); });
}

// ---- TransformerLM ----

TEST_CASE("TransformerLM: names, parameter count, shapes, initial loss and scaled init") {
  nn::TransformerLMConfig config;
  config.vocab_size = 11;
  config.n_layer = 3;
  config.n_head = 4;
  config.n_embd = 64;
  config.block_size = 16;
  nn::TransformerLM model(config, 42);
  const int64_t V = 11, C = 64, L = 3, Tm = 16;
  const int64_t per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) +
                            (4 * C * C + C);
  CHECK(model.num_parameters() == V * C + Tm * C + L * per_block + 2 * C);
  auto named = model.named_parameters();
  CHECK(named[0].first == "wte.weight");
  CHECK(named[1].first == "wpe.weight");
  CHECK(named[2].first == "h.0.ln_1.weight");
  CHECK(named[4].first == "h.0.attn.c_attn.weight");
  CHECK(named.back().first == "ln_f.bias");

  std::vector<int32_t> ids(32), next(32);
  for (int i = 0; i < 32; ++i) {
    ids[i] = (i * 7) % 11;
    next[i] = (i * 7 + 3) % 11;
  }
  Tensor idx = from_vector(ids, {2, 16});
  Tensor logits = model.forward(idx);
  CHECK(logits.shape() == Shape{2, 16, 11});
  // Small init: the initial loss is close to ln(V).
  double loss = model.loss(idx, from_vector(next, {2, 16})).item<float>();
  CHECK(loss == doctest::Approx(std::log(11.0)).epsilon(0.05));
  // Shorter sequences are fine.
  CHECK(model.forward(idx.narrow(1, 0, 5)).shape() == Shape{2, 5, 11});

  // Residual projections use std 0.02 / sqrt(2 n_layer); others 0.02.
  auto std_of = [](const Tensor& t) {
    double sq = 0;
    std::vector<float> v = t.to_vector<float>();
    for (float e : v) sq += double(e) * e;
    return std::sqrt(sq / v.size());
  };
  double proj_std = 0.02 / std::sqrt(6.0);
  auto* attn = dynamic_cast<nn::CausalSelfAttention*>(model.h[0]->attn.get());
  REQUIRE(attn != nullptr);
  CHECK(std_of(attn->c_proj->weight) == doctest::Approx(proj_std).epsilon(0.05));
  CHECK(std_of(model.h[2]->mlp->c_proj->weight) == doctest::Approx(proj_std).epsilon(0.05));
  CHECK(std_of(model.h[1]->mlp->c_fc->weight) == doctest::Approx(0.02).epsilon(0.05));

  config.tie_weights = false;
  nn::TransformerLM untied(config, 42);
  CHECK(untied.lm_head != nullptr);
  CHECK(untied.num_parameters() == model.num_parameters() + V * C);

  // Without learned positions (for attention that encodes them itself).
  config.position_embedding = "none";
  nn::TransformerLM no_pos(config, 42);
  CHECK(no_pos.wpe == nullptr);
  CHECK(!no_pos.state_dict().contains("wpe.weight"));
  CHECK(no_pos.num_parameters() == untied.num_parameters() - Tm * C);
  CHECK(no_pos.forward(idx).shape() == Shape{2, 16, 11});
  config.position_embedding = "alibi";
  CHECK_THROWS_WITH_AS(nn::TransformerLM{config},
                       doctest::Contains("position_embedding must be \"learned\", \"none\" or \"rope\", got \"alibi\""),
                       Error);
}

TEST_CASE("TransformerLM input errors") {
  nn::TransformerLM model(tiny_config());
  CHECK_THROWS_WITH_AS(model.forward(ops::zeros({1, 7}, {DType::Int32})),
                       doctest::Contains("sequence length 7 must be in [1, block_size = 6]"), Error);
  CHECK_THROWS_WITH_AS(model.forward(ops::zeros({1, 3})),
                       doctest::Contains("expected int32 token ids (B, T), got float32 [1, 3]"), Error);
  Tensor idx = ops::zeros({1, 3}, {DType::Int32});
  CHECK_THROWS_WITH_AS(model.loss(idx, ops::zeros({3}, {DType::Int32})),
                       doctest::Contains("targets must be int32 of the ids' shape [1, 3]"), Error);
  nn::TransformerLMConfig bad = tiny_config();
  bad.n_embd = 9;
  CHECK_THROWS_WITH_AS(nn::TransformerLM{bad}, doctest::Contains("n_embd 9 must be a positive multiple of n_head 2"),
                       Error);
}

TEST_CASE("TransformerLM is deterministic by seed") {
  nn::TransformerLM a(tiny_config(), 5), b(tiny_config(), 5), c(tiny_config(), 6);
  CHECK(a.wte->weight.to_vector<float>() == b.wte->weight.to_vector<float>());
  CHECK(a.h[1]->mlp->c_fc->weight.to_vector<float>() == b.h[1]->mlp->c_fc->weight.to_vector<float>());
  CHECK(a.wte->weight.to_vector<float>() != c.wte->weight.to_vector<float>());
}

TEST_CASE("generate appends sampled ids and crops the context to block_size") {
  nn::TransformerLM model(tiny_config(), 8);
  model.eval();
  autograd::clear_tape();  // earlier forwards without backward left nodes
  int calls = 0;
  auto argmax = [&](const std::vector<float>& logits) {
    CHECK(logits.size() == 5);
    ++calls;
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  };
  std::vector<int32_t> out = model.generate({1, 2}, 10, argmax);
  CHECK(out.size() == 12);
  CHECK(calls == 10);
  CHECK(out[0] == 1);
  CHECK(out[1] == 2);
  CHECK(autograd::tape_size() == 0);  // no autograd recorded
  CHECK(model.generate({1, 2}, 10, argmax) == out);
  CHECK_THROWS_WITH_AS(model.generate({1}, 1, [](const std::vector<float>&) { return 9; }),
                       doctest::Contains("sampled id 9 is outside the vocabulary [0, 5)"), Error);
}

TEST_CASE("config metadata round trip and errors") {
  nn::TransformerLMConfig c = tiny_config();
  c.dropout = 0.1;
  c.bias = false;
  c.attention = "dilated";
  c.attention_options["segments"] = "4,8";
  nn::Metadata m = c.to_metadata();
  CHECK(m.at("model.n_embd") == "8");
  CHECK(m.at("model.attention.segments") == "4,8");
  m["unrelated.key"] = "x";  // other metadata is ignored
  nn::TransformerLMConfig r = nn::TransformerLMConfig::from_metadata(m);
  CHECK(r.vocab_size == 5);
  CHECK(r.n_layer == 2);
  CHECK(r.dropout == 0.1);
  CHECK(!r.bias);
  CHECK(r.tie_weights);
  CHECK(r.attention == "dilated");
  CHECK(r.attention_options == std::map<std::string, std::string>{{"segments", "4,8"}});
  CHECK(r.position_embedding == "learned");

  m.erase("model.n_head");
  CHECK_THROWS_WITH_AS(nn::TransformerLMConfig::from_metadata(m),
                       doctest::Contains("missing key 'model.n_head'"), Error);
  m["model.n_head"] = "two";
  CHECK_THROWS_WITH_AS(nn::TransformerLMConfig::from_metadata(m),
                       doctest::Contains("key 'model.n_head' is not an integer: 'two'"), Error);
}

TEST_CASE("attention registry: custom layers plug into the blocks") {
  nn::register_attention("scale-test", [](const nn::AttentionInit& init) {
    return std::make_shared<ScaleAttention>(init);
  });
  nn::TransformerLMConfig config = tiny_config();
  config.attention = "scale-test";
  nn::TransformerLM model(config);
  CHECK(dynamic_cast<ScaleAttention*>(model.h[0]->attn.get()) != nullptr);
  CHECK(model.state_dict().contains("h.1.attn.scale"));
  CHECK(model.forward(ops::zeros({1, 3}, {DType::Int32})).shape() == Shape{1, 3, 5});

  config.attention = "no-such-attention";
  CHECK_THROWS_WITH_AS(nn::TransformerLM{config},
                       doctest::Contains("unknown attention 'no-such-attention'; registered: 'causal'"),
                       Error);
}
