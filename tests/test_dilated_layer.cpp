// nn::DilatedAttention and rotary embeddings in the attention layers: shapes,
// argument and option errors, float64 gradchecks, equivalence with
// CausalSelfAttention for one dense branch, a dilated + rope TransformerLM
// that learns and round-trips through a checkpoint, and CUDA parity.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "examples/charlm/vocab.h"  // the text tokenizer
#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::check_module_grads;
using minidl::testing::check_causal;
using minidl::testing::random_tensor;

namespace {

const TensorOptions kF64{DType::Float64, Device::cpu(), false};

TensorOptions grad_f64() { return {DType::Float64, Device::cpu(), true}; }

// Randomises every parameter (far from the small init, so attention weights
// are far from uniform and rope's rotations matter).
void randomize(const nn::Module& module, double scale = 1.0) {
  NoGradGuard no_grad;
  for (const Tensor& p : module.parameters())
    ops::copy_(p, ops::mul(random_tensor(p.shape(), {p.dtype()}), scale));
}

nn::TransformerLMConfig dilated_rope_config(int64_t vocab_size) {
  nn::TransformerLMConfig c;
  c.vocab_size = vocab_size;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 32;
  c.block_size = 32;
  c.attention = "dilated";
  c.attention_options = {{"segments", "8,16,32"}, {"dilations", "1,2,4"}};
  c.position_embedding = "rope";
  return c;
}

// Max |a - b| within rel * max|b| (for CUDA results from TF32 matmuls).
void check_scaled(const Tensor& a, const Tensor& b, double rel) {
  std::vector<double> y = b.to_vector<double>();
  double scale = 0;
  for (double e : y) scale = std::max(scale, std::abs(e));
  check_close(a, b, rel * scale, rel);
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() /
           ("minidl_dilated_layer_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

}  // namespace

TEST_CASE("DilatedAttention: shapes, parameter names, built by the registry from the config") {
  Generator gen(1);
  nn::DilatedAttention attn(8, 2, {4, 8}, {1, 2}, true, 0.0, gen);
  Tensor x = random_tensor({2, 10, 8}, {DType::Float32});
  CHECK(attn.forward(x).shape() == Shape{2, 10, 8});
  CHECK(attn.forward(x.narrow(1, 0, 3)).shape() == Shape{2, 3, 8});  // T below every segment
  std::vector<std::string> names;
  for (const auto& [name, p] : attn.named_parameters()) names.push_back(name);
  CHECK(names == std::vector<std::string>{"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"});
  CHECK(!attn.rope_base.has_value());

  std::vector<std::string> kinds = nn::registered_attentions();
  CHECK(std::find(kinds.begin(), kinds.end(), "dilated") != kinds.end());
  CHECK(std::find(kinds.begin(), kinds.end(), "causal") != kinds.end());

  nn::TransformerLMConfig config = dilated_rope_config(7);
  config.attention_options["segments"] = " 8, 16 ,32";  // spaces are fine
  nn::TransformerLM model(config, 3);
  auto* layer = dynamic_cast<nn::DilatedAttention*>(model.h[1]->attn.get());
  REQUIRE(layer != nullptr);
  CHECK(layer->segments == std::vector<int64_t>{8, 16, 32});
  CHECK(layer->dilations == std::vector<int64_t>{1, 2, 4});
  CHECK(layer->rope_base == nn::kDefaultRopeBase);
  CHECK(model.wpe == nullptr);
  CHECK(model.state_dict().contains("h.0.attn.c_attn.weight"));
  CHECK(model.forward(ops::zeros({2, 20}, {DType::Int32})).shape() == Shape{2, 20, 7});

  config.attention_options["rope_base"] = "500";
  nn::TransformerLM based(config, 3);
  CHECK(dynamic_cast<nn::DilatedAttention*>(based.h[0]->attn.get())->rope_base == 500.0);
  // "rope" reaches the causal layer too; "learned" keeps the table and no rotation.
  config.attention = "causal";
  nn::TransformerLM causal(config, 3);
  CHECK(dynamic_cast<nn::CausalSelfAttention*>(causal.h[0]->attn.get())->rope_base == 500.0);
  CHECK(causal.wpe == nullptr);
  config.position_embedding = "learned";
  nn::TransformerLM learned(config, 3);
  CHECK(!dynamic_cast<nn::CausalSelfAttention*>(learned.h[0]->attn.get())->rope_base.has_value());
  CHECK(learned.wpe != nullptr);
}

TEST_CASE("a rope model has no position table: block_size costs no parameters") {
  nn::TransformerLMConfig config = dilated_rope_config(7);
  nn::TransformerLM small(config, 1);
  config.block_size = int64_t{1} << 20;
  nn::TransformerLM huge(config, 1);
  CHECK(huge.num_parameters() == small.num_parameters());
  // Longer than any segment: runs, and positions beyond the training context are fine.
  NoGradGuard no_grad;
  CHECK(huge.forward(ops::zeros({1, 300}, {DType::Int32})).shape() == Shape{1, 300, 7});
}

TEST_CASE("DilatedAttention argument errors") {
  Generator gen(2);
  auto make = [&](int64_t width, int64_t heads, std::vector<int64_t> w, std::vector<int64_t> r,
                  std::optional<double> rope = std::nullopt) {
    return nn::DilatedAttention(width, heads, w, r, true, 0.0, gen, nullptr, {}, 0.02, rope);
  };
  CHECK_THROWS_WITH_AS(make(8, 3, {4}, {1}),
                       doctest::Contains("DilatedAttention: n_embd 8 must be a positive multiple of n_head 3"),
                       Error);
  CHECK_THROWS_WITH_AS(make(8, 0, {4}, {1}), doctest::Contains("positive multiple of n_head 0"), Error);
  CHECK_THROWS_WITH_AS(make(8, 2, {}, {}), doctest::Contains("DilatedAttention: segments is empty"), Error);
  CHECK_THROWS_WITH_AS(make(8, 2, {4, 8}, {1}),
                       doctest::Contains("DilatedAttention: segments [4, 8] has 2 entries but dilations "
                                         "[1] has 1; give one dilation per segment"),
                       Error);
  CHECK_THROWS_WITH_AS(make(8, 2, {4, 0}, {1, 2}),
                       doctest::Contains("DilatedAttention: segment lengths must be >= 1, got 0 in segments [4, 0]"),
                       Error);
  CHECK_THROWS_WITH_AS(make(8, 2, {4, 8}, {1, -2}),
                       doctest::Contains("DilatedAttention: dilations must be >= 1, got -2 in dilations [1, -2]"),
                       Error);
  CHECK_THROWS_WITH_AS(make(6, 2, {4}, {1}, 10000.0),
                       doctest::Contains("DilatedAttention: rotary embeddings need an even head dim, got "
                                         "n_embd 6 / n_head 2 = 3"),
                       Error);
  CHECK_THROWS_WITH_AS(make(8, 2, {4}, {1}, -1.0),
                       doctest::Contains("DilatedAttention: rope_base must be positive and finite, got -1"),
                       Error);
  CHECK_THROWS_WITH_AS(nn::CausalSelfAttention(6, 2, true, 0.0, gen, nullptr, {}, 0.02, 10000.0),
                       doctest::Contains("CausalSelfAttention: rotary embeddings need an even head dim"),
                       Error);
  nn::DilatedAttention ok = make(8, 2, {4}, {1});
  CHECK_THROWS_WITH_AS(ok.forward(ops::zeros({2, 3, 6})),
                       doctest::Contains("DilatedAttention: expected input (B, T, 8), got [2, 3, 6]"), Error);
}

TEST_CASE("dilated attention options parse with clear errors") {
  CHECK(nn::parse_attention_int_list("segments", "64,128,256") == std::vector<int64_t>{64, 128, 256});
  CHECK(nn::parse_attention_int_list("dilations", " 1 , 2") == std::vector<int64_t>{1, 2});
  CHECK(nn::parse_attention_int_list("segments", "5") == std::vector<int64_t>{5});
  for (const char* bad : {"", "64,,128", "64,x", "0,1", "-1", "1.5", "64,"}) {
    CAPTURE(bad);
    const std::string want = std::string("attention option 'segments' must be a comma-separated list of "
                                         "positive integers (e.g. \"64,128,256\"), got '") + bad + "'";
    CHECK_THROWS_WITH_AS(nn::parse_attention_int_list("segments", bad), doctest::Contains(want.c_str()),
                         Error);
  }
  auto build = [](const std::map<std::string, std::string>& options,
                  const std::string& pos = "rope") {
    nn::TransformerLMConfig config = dilated_rope_config(5);
    config.attention_options = options;
    config.position_embedding = pos;
    return nn::TransformerLM(config);
  };
  CHECK_THROWS_WITH_AS(build({{"dilations", "1"}}),
                       doctest::Contains("DilatedAttention: attention option 'segments' is missing; set "
                                         "config.attention_options[\"segments\"], e.g. \"64,128,256\""),
                       Error);
  CHECK_THROWS_WITH_AS(build({{"segments", "8"}}),
                       doctest::Contains("attention option 'dilations' is missing"), Error);
  CHECK_THROWS_WITH_AS(build({{"segments", "8,16"}, {"dilations", "1,2,4"}}),
                       doctest::Contains("segments [8, 16] has 2 entries but dilations [1, 2, 4] has 3"),
                       Error);
  CHECK_THROWS_WITH_AS(build({{"segments", "8"}, {"dilation", "1"}}),
                       doctest::Contains("DilatedAttention: unknown attention option 'dilation'; known: "
                                         "'segments', 'dilations', 'rope_base', 'dropout'"),
                       Error);
  CHECK_THROWS_WITH_AS(build({{"segments", "8"}, {"dilations", "1"}, {"dropout", "per-pair"}}),
                       doctest::Contains("attention option 'dropout' is 'per-pair'; give 'per_copy' or 'per_pair'"),
                       Error);
  // LongNet's dilation 16 does not divide 8: no nesting, nothing for per_pair to change.
  CHECK_THROWS_WITH_AS(build({{"segments", "4,8"}, {"dilations", "1,16"}, {"dropout", "per_pair"}}),
                       doctest::Contains("attention option 'dropout' is 'per_pair', but segments [4, 8] and "
                                         "dilations [1, 16] do not nest at block_size"),
                       Error);
  // "dropout" picks how the layer's attention dropout treats shared pairs.
  for (const char* value : {"per_copy", " per_pair"}) {
    CAPTURE(value);
    const nn::TransformerLM model = build({{"segments", "4,8"}, {"dilations", "1,2"}, {"dropout", value}});
    CHECK(dynamic_cast<nn::DilatedAttention*>(model.h[0]->attn.get())->dropout_per_pair ==
          (std::string(value) == " per_pair"));
  }
  CHECK_THROWS_WITH_AS(build({{"segments", "8"}, {"dilations", "1"}, {"rope_base", "big"}}),
                       doctest::Contains("attention option 'rope_base' must be a positive number, got 'big'"),
                       Error);
  CHECK_THROWS_WITH_AS(build({{"segments", "8"}, {"dilations", "1"}, {"rope_base", "0"}}),
                       doctest::Contains("'rope_base' must be a positive number, got '0'"), Error);
  // rope_base is only read when position_embedding is "rope".
  CHECK(build({{"segments", "8"}, {"dilations", "1"}, {"rope_base", "big"}}, "none").wpe == nullptr);
}

TEST_CASE("gradcheck DilatedAttention (float64), with and without rope") {
  // Branches of every kind: dense short segments, dilated, r > H, w > T.
  for (std::optional<double> rope : {std::optional<double>(), std::optional<double>(100.0)}) {
    CAPTURE(rope.has_value());
    Generator gen(3);
    nn::DilatedAttention attn(8, 2, {2, 4, 9}, {1, 2, 3}, true, 0.0, gen, nullptr, kF64, 0.02, rope);
    randomize(attn);
    Tensor x = random_tensor({2, 7, 8}, grad_f64());
    check_module_grads(attn, x, [&] { return attn.forward(x); });
  }
}

TEST_CASE("gradcheck CausalSelfAttention with rope") {
  Generator gen(4);
  nn::CausalSelfAttention attn(8, 2, true, 0.0, gen, nullptr, kF64, 0.02, 50.0);
  randomize(attn);
  Tensor x = random_tensor({2, 5, 8}, grad_f64());
  check_module_grads(attn, x, [&] { return attn.forward(x); });
}

TEST_CASE("one branch w >= T, r = 1 is CausalSelfAttention given the same weights") {
  const int64_t T = 9;
  for (std::optional<double> rope : {std::optional<double>(), std::optional<double>(10000.0)}) {
    for (int64_t w : {T, 1000 * T}) {
      CAPTURE(rope.has_value());
      CAPTURE(w);
      Generator gen_a(5), gen_b(6);
      nn::CausalSelfAttention causal(16, 4, true, 0.0, gen_a, nullptr, kF64, 0.02, rope);
      nn::DilatedAttention dilated(16, 4, {w}, {1}, true, 0.0, gen_b, nullptr, kF64, 0.02, rope);
      randomize(causal);
      dilated.load_state_dict(causal.state_dict());
      Tensor x = random_tensor({3, T, 16}, grad_f64());
      Tensor seed = random_tensor({3, T, 16});
      Tensor yc = causal.forward(x);
      Tensor yd = dilated.forward(x);
      check_close(yd, yc, 1e-13, 1e-13);
      ops::sum(ops::mul(yc, seed)).backward();
      Tensor gx_causal = x.grad(), gw_causal = causal.c_attn->weight.grad();
      x.zero_grad();
      ops::sum(ops::mul(yd, seed)).backward();
      check_close(x.grad(), gx_causal, 1e-13, 1e-13);
      check_close(dilated.c_attn->weight.grad(), gw_causal, 1e-13, 1e-13);
    }
  }
  // With rope the two differ from the layer without it (positions matter).
  Generator gen(7);
  nn::CausalSelfAttention plain(16, 4, true, 0.0, gen, nullptr, kF64);
  nn::CausalSelfAttention rotary(16, 4, true, 0.0, gen, nullptr, kF64, 0.02, 10000.0);
  randomize(plain);
  rotary.load_state_dict(plain.state_dict());
  Tensor x = random_tensor({1, T, 16});
  Tensor a = plain.forward(x), b = rotary.forward(x);
  check_close(a.narrow(1, 0, 1), b.narrow(1, 0, 1), 1e-14, 1e-14);  // position 0: no turn, one key
  CHECK(a.narrow(1, 1, T - 1).to_vector<double>() != b.narrow(1, 1, T - 1).to_vector<double>());
}

TEST_CASE("DilatedAttention is causal: later tokens do not change earlier outputs") {
  Generator gen(8);
  nn::DilatedAttention attn(8, 2, {3, 6}, {1, 2}, true, 0.0, gen, nullptr, kF64, 0.3, 10000.0);
  check_causal(attn, 8, 8, 1e-14);
}

TEST_CASE("a dilated + rope TransformerLM learns a tiny text and round-trips a checkpoint") {
  omp_set_num_threads(1);  // tiny matrices: threads cost more than they save
  std::string text;
  for (int i = 0; i < 40; ++i) text += "the quick brown fox jumps over the lazy dog.\n";
  charlm::CharVocab vocab = charlm::CharVocab::from_text(text);
  nn::TrainValSplit split = nn::split_train_val(vocab.encode(text));
  nn::TransformerLMConfig config = dilated_rope_config(vocab.size());
  nn::TransformerLM model(config, 1337);
  nn::BatchSampler train(split.train, 8, config.block_size, 1);
  nn::BatchSampler val(split.val, 8, config.block_size, 2);
  nn::AdamW opt(nn::weight_decay_groups(model, 0.1), {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.99});
  auto val_loss = [&] {
    NoGradGuard no_grad;
    model.eval();
    double total = 0;
    for (int i = 0; i < 3; ++i) {
      auto [x, y] = val.next();
      total += model.loss(x, y).item<float>();
    }
    model.train();
    return total / 3;
  };
  const double ln_v = std::log(static_cast<double>(vocab.size()));
  const double initial = val_loss();
  CHECK(initial == doctest::Approx(ln_v).epsilon(0.1));
  std::vector<double> losses;
  for (int step = 0; step < 80; ++step) {
    auto [x, y] = train.next();
    Tensor loss = model.loss(x, y);
    opt.zero_grad();
    loss.backward();
    nn::clip_grad_norm_(model.parameters(), 1.0);
    opt.step();
    losses.push_back(loss.item<float>());
  }
  const double final_val = val_loss();
  MESSAGE("dilated + rope: val loss ", initial, " -> ", final_val, ", train loss ", losses.front(),
          " -> ", losses.back());
  CHECK(losses.back() < 0.6 * losses.front());
  CHECK(final_val < 0.6 * initial);

  // Checkpoint: config metadata + tensors restore the same model.
  TempDir dir;
  const std::string path = (dir.path / "dilated_rope.ckpt").string();
  nn::save_checkpoint(path, model.state_dict(), config.to_metadata());
  nn::Checkpoint ckpt = nn::load_checkpoint(path);
  nn::TransformerLMConfig restored = nn::TransformerLMConfig::from_metadata(ckpt.metadata);
  CHECK(restored.attention == "dilated");
  CHECK(restored.position_embedding == "rope");
  CHECK(restored.attention_options == config.attention_options);
  CHECK(!ckpt.tensors.contains("wpe.weight"));
  nn::TransformerLM reloaded(restored, 99);
  reloaded.load_state_dict(ckpt.tensors);
  auto* layer = dynamic_cast<nn::DilatedAttention*>(reloaded.h[0]->attn.get());
  REQUIRE(layer != nullptr);
  CHECK(layer->dilations == std::vector<int64_t>{1, 2, 4});
  CHECK(layer->rope_base == nn::kDefaultRopeBase);
  model.eval();
  reloaded.eval();
  NoGradGuard no_grad;
  Tensor idx = val.next().first;
  CHECK(reloaded.forward(idx).to_vector<float>() == model.forward(idx).to_vector<float>());
}

// ---------------------------------------------------------------------------
// Attention-probability dropout in the layers: the layer's p and dropout
// generator reach the fused op while training, nothing changes in eval mode.

namespace {

const double kLayerDropout = 0.3;

// The layer's forward spelled out with ops: the attention op draws its mask
// first (one generator offset), then the residual dropout (the next).
Tensor manual_forward(const nn::Linear& c_attn, const nn::Linear& c_proj, const Tensor& x,
                      int64_t n_head, const std::vector<int64_t>& segments,
                      const std::vector<int64_t>& dilations, double p, Generator& gen) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  std::vector<Tensor> parts = ops::split(c_attn.forward(x), C, 2);
  auto head = [&](size_t i) { return parts[i].view({B, T, n_head, C / n_head}); };
  Tensor y = ops::dilated_attention(head(0), head(1), head(2), segments, dilations, true, 0, p, &gen).first;
  return ops::dropout(c_proj.forward(y.reshape({B, T, C})), p, true, &gen);
}

}  // namespace

TEST_CASE("attention dropout: training uses the layer's p and generator; eval and p = 0 are unchanged") {
  const std::vector<int64_t> segments = {3, 8}, dilations = {1, 2};
  for (bool dilated : {true, false}) {
    CAPTURE(dilated);
    Generator init_a(11), init_b(11), drop_gen(77);
    std::shared_ptr<nn::AttentionLayer> with_dropout, without;
    std::shared_ptr<nn::Linear> c_attn, c_proj;
    if (dilated) {
      auto a = std::make_shared<nn::DilatedAttention>(16, 4, segments, dilations, true, kLayerDropout,
                                                      init_a, &drop_gen, kF64);
      with_dropout = a;
      c_attn = a->c_attn;
      c_proj = a->c_proj;
      without = std::make_shared<nn::DilatedAttention>(16, 4, segments, dilations, true, 0.0, init_b,
                                                       nullptr, kF64);
    } else {
      auto a = std::make_shared<nn::CausalSelfAttention>(16, 4, true, kLayerDropout, init_a, &drop_gen, kF64);
      with_dropout = a;
      c_attn = a->c_attn;
      c_proj = a->c_proj;
      without = std::make_shared<nn::CausalSelfAttention>(16, 4, true, 0.0, init_b, nullptr, kF64);
    }
    randomize(*with_dropout);
    without->load_state_dict(with_dropout->state_dict());
    Tensor x = random_tensor({2, 9, 16});
    NoGradGuard no_grad;

    // p = 0 draws nothing and trains exactly as it evaluates.
    const uint64_t default_offset = default_generator().offset();
    Tensor plain = without->forward(x);
    without->eval();
    CHECK(without->forward(x).to_vector<double>() == plain.to_vector<double>());
    CHECK(default_generator().offset() == default_offset);

    // Eval mode: exactly the layer without dropout, no offset drawn.
    with_dropout->eval();
    CHECK(with_dropout->forward(x).to_vector<double>() == plain.to_vector<double>());
    CHECK(drop_gen.offset() == 0);

    // Training: attention mask at offset 0, residual mask at offset 1, both from drop_gen.
    with_dropout->train();
    drop_gen.set_state(77, 0);
    Tensor y = with_dropout->forward(x);
    CHECK(drop_gen.offset() == 2);
    Generator replay(77);
    Tensor want = manual_forward(*c_attn, *c_proj, x, 4, dilated ? segments : std::vector<int64_t>{9},
                                 dilated ? dilations : std::vector<int64_t>{1}, kLayerDropout, replay);
    CHECK(y.to_vector<double>() == want.to_vector<double>());
    // Per-pair dropout (branches 3/1, 8/2 do not nest: 3 is not a multiple of 2) changes nothing here;
    // where they nest it is the op's with dropout_per_pair (test_dilated_attention checks the op).
    if (dilated) {
      static_cast<nn::DilatedAttention&>(*with_dropout).dropout_per_pair = true;
      drop_gen.set_state(77, 0);
      CHECK(with_dropout->forward(x).to_vector<double>() == y.to_vector<double>());
      static_cast<nn::DilatedAttention&>(*with_dropout).dropout_per_pair = false;
    }
    // Only the residual dropout (ops::dropout at offset 1) would give another output.
    Generator residual_only(77);
    residual_only.next_offset();
    Tensor resid = ops::dropout(plain, kLayerDropout, true, &residual_only);
    CHECK(y.to_vector<double>() != resid.to_vector<double>());
  }
}

TEST_CASE("gradcheck DilatedAttention and CausalSelfAttention with dropout, generator reset per call") {
  Generator gen(3), drop_gen(5);
  nn::DilatedAttention dilated(8, 2, {2, 4, 9}, {1, 2, 3}, true, 0.25, gen, &drop_gen, kF64, 0.02, 100.0);
  nn::CausalSelfAttention causal(8, 2, true, 0.25, gen, &drop_gen, kF64);
  for (nn::AttentionLayer* attn : std::vector<nn::AttentionLayer*>{&dilated, &causal}) {
    randomize(*attn);
    Tensor x = random_tensor({2, 7, 8}, grad_f64());
    check_module_grads(*attn, x, [&] {
      drop_gen.set_state(5, 3);  // the same masks at every evaluation
      return attn->forward(x);
    });
  }
}

TEST_CASE("CUDA DilatedAttention with rope matches the CPU, forward and backward") {
  MINIDL_REQUIRE_CUDA();
  // Head dim 32: the CUDA attention kernels take 32, 64 or 128.
  Generator gen_cpu(9), gen_cuda(9);
  nn::DilatedAttention cpu_attn(64, 2, {8, 16, 64}, {1, 2, 4}, true, 0.0, gen_cpu, nullptr, {}, 0.02,
                                10000.0);
  nn::DilatedAttention cuda_attn(64, 2, {8, 16, 64}, {1, 2, 4}, true, 0.0, gen_cuda, nullptr, {}, 0.02,
                                 10000.0);
  randomize(cpu_attn, 0.3);
  cuda_attn.load_state_dict(cpu_attn.state_dict());
  cuda_attn.to(Device::cuda());
  Tensor x = random_tensor({2, 45, 64}, {DType::Float32});
  Tensor seed = random_tensor({2, 45, 64}, {DType::Float32});
  Tensor xc = x.clone().requires_grad_(true), xg = x.to(Device::cuda()).requires_grad_(true);
  Tensor yc = cpu_attn.forward(xc), yg = cuda_attn.forward(xg);
  CHECK(yg.is_cuda());
  check_scaled(yg, yc, 5e-3);  // TF32 projections, fp32 attention
  ops::sum(ops::mul(yc, seed)).backward();
  ops::sum(ops::mul(yg, seed.to(Device::cuda()))).backward();
  check_scaled(xg.grad(), xc.grad(), 1e-2);
  check_scaled(cuda_attn.c_attn->weight.grad(), cpu_attn.c_attn->weight.grad(), 1e-2);
  check_scaled(cuda_attn.c_proj->weight.grad(), cpu_attn.c_proj->weight.grad(), 1e-2);

  // bfloat16 forward: one bf16 rounding of inputs, weights and outputs apart.
  cuda_attn.to(DType::BFloat16);
  NoGradGuard no_grad;
  check_scaled(cuda_attn.forward(x.to(Device::cuda()).to(DType::BFloat16)), yc, 5e-2);
}

TEST_CASE("CUDA dilated + rope TransformerLM matches the CPU and trains") {
  MINIDL_REQUIRE_CUDA();
  nn::TransformerLMConfig config = dilated_rope_config(11);
  config.n_embd = 64;  // head dim 32
  nn::TransformerLM cpu_model(config, 21), cuda_model(config, 21);
  cuda_model.to(Device::cuda());
  std::vector<int32_t> ids(2 * 32);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 7) % 11);
  Tensor idx = from_vector(ids, {2, 32});
  check_scaled(cuda_model.forward(idx.to(Device::cuda())), cpu_model.forward(idx), 5e-3);
  nn::AdamW opt(nn::weight_decay_groups(cuda_model, 0.1), {.lr = 1e-2});
  Tensor targets = idx.to(Device::cuda());  // learn to copy the current token
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    Tensor loss = cuda_model.loss(idx.to(Device::cuda()), targets);
    opt.zero_grad();
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<float>();
  }
  CHECK(last < 0.5 * first);
}

TEST_CASE("CUDA DilatedAttention with dropout: the CPU's masks for the same generator state") {
  MINIDL_REQUIRE_CUDA();
  Generator gen_cpu(9), gen_cuda(9), drop_cpu(1), drop_cuda(1);
  nn::DilatedAttention cpu_attn(64, 2, {8, 16, 64}, {2, 1, 4}, true, 0.2, gen_cpu, &drop_cpu);
  nn::DilatedAttention cuda_attn(64, 2, {8, 16, 64}, {2, 1, 4}, true, 0.2, gen_cuda, &drop_cuda);
  randomize(cpu_attn, 0.3);
  cuda_attn.load_state_dict(cpu_attn.state_dict());
  cuda_attn.to(Device::cuda());
  Tensor x = random_tensor({2, 45, 64}, {DType::Float32});
  Tensor seed = random_tensor({2, 45, 64}, {DType::Float32});
  Tensor xc = x.clone().requires_grad_(true), xg = x.to(Device::cuda()).requires_grad_(true);
  drop_cpu.set_state(42, 3);
  drop_cuda.set_state(42, 3);
  Tensor yc = cpu_attn.forward(xc), yg = cuda_attn.forward(xg);
  CHECK(drop_cuda.offset() == 5);
  check_scaled(yg, yc, 5e-3);  // TF32 projections, fp32 attention
  ops::sum(ops::mul(yc, seed)).backward();
  ops::sum(ops::mul(yg, seed.to(Device::cuda()))).backward();
  check_scaled(xg.grad(), xc.grad(), 1e-2);
  check_scaled(cuda_attn.c_attn->weight.grad(), cpu_attn.c_attn->weight.grad(), 1e-2);

  // bfloat16 forward: one bf16 rounding of inputs, weights and outputs apart.
  cuda_attn.to(DType::BFloat16);
  NoGradGuard no_grad;
  drop_cuda.set_state(42, 3);
  check_scaled(cuda_attn.forward(x.to(Device::cuda()).to(DType::BFloat16)), yc, 5e-2);
}
