// Incremental decoding with a KVCache (TransformerLM::forward(idx, cache),
// MultiHeadSelfAttention::forward(x, cache)): logits equal the full forward
// at every position for vanilla and dilated attention, learned and rotary
// positions, across segment boundaries, chunked and one id at a time (CPU
// float64; CUDA at bf16 tolerance); generate()'s window past the context;
// the replay fallback of custom attention layers; errors.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;

namespace {

// Far from the small init, so attention weights are far from uniform: a
// query attending a wrong key set changes the logits visibly.
void randomize(const nn::Module& module, double scale) {
  NoGradGuard no_grad;
  for (const Tensor& p : module.parameters())
    ops::copy_(p, ops::mul(random_tensor(p.shape(), {p.dtype(), p.device()}), scale));
}

struct Variant {
  std::string name, attention, segments, dilations, position_embedding;
};

// Dilated: several branches, dilations > 1 with more heads than the
// dilation, segments that do not divide the sequence or exceed it; the last
// has no r = 1 branch (rows kept nowhere) and a dilation above the head count.
const std::vector<Variant> kVariants = {
    {"vanilla learned", "causal", "", "", "learned"},
    {"vanilla rope", "causal", "", "", "rope"},
    {"dilated learned", "dilated", "3,5,16", "1,2,3", "learned"},
    {"dilated rope", "dilated", "3,5,16", "1,2,3", "rope"},
    {"dilated rope, rows kept nowhere", "dilated", "4,7", "2,5", "rope"},
};

nn::TransformerLMConfig config_for(const Variant& variant, int64_t n_embd, int64_t block_size) {
  nn::TransformerLMConfig c;
  c.vocab_size = 11;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_embd = n_embd;
  c.block_size = block_size;
  c.dropout = 0.1;  // eval() turns it off
  c.attention = variant.attention;
  if (variant.attention == "dilated")
    c.attention_options = {{"segments", variant.segments}, {"dilations", variant.dilations}};
  c.position_embedding = variant.position_embedding;
  return c;
}

Tensor random_ids(int64_t batch, int64_t n, int64_t vocab_size, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(batch * n));
  uint64_t state = seed;
  for (int32_t& id : ids) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    id = static_cast<int32_t>((state >> 33) % static_cast<uint64_t>(vocab_size));
  }
  return from_vector(ids, {batch, n});
}

// Feeds idx (B, N) through forward(., cache) in chunks of the given sizes
// and returns the logits of all positions, concatenated.
Tensor incremental_logits(const nn::TransformerLM& model, const Tensor& idx,
                          const std::vector<int64_t>& chunks) {
  nn::KVCache cache;
  std::vector<Tensor> parts;
  int64_t pos = 0;
  for (int64_t n : chunks) {
    parts.push_back(model.forward(idx.narrow(1, pos, n), cache));
    pos += n;
    CHECK(cache.length == pos);
  }
  REQUIRE(pos == idx.size(1));
  return ops::cat(parts, 1);
}

// Prefill 4 ids (past a w = 3 boundary), single ids, a chunk of 3 with a
// filled cache (past the w = 5 boundary at 10), single ids to 13.
const std::vector<int64_t> kChunks = {4, 1, 1, 1, 1, 1, 3, 1};

}  // namespace

TEST_CASE("cached forward equals the full forward at every position (CPU float64)") {
  for (const Variant& variant : kVariants) {
    CAPTURE(variant.name);
    nn::TransformerLM model(config_for(variant, 16, 13), 3, {DType::Float64});
    randomize(model, 1.0);
    model.eval();
    Tensor idx = random_ids(2, 13, 11, 7);
    Tensor full = model.forward(idx);
    check_close(incremental_logits(model, idx, kChunks), full, 1e-10, 1e-10);
    // One id at a time from the start: the first step is a prefill of one.
    check_close(incremental_logits(model, idx, std::vector<int64_t>(13, 1)), full, 1e-10, 1e-10);
    // Prefill of everything but the last id, then one step.
    check_close(incremental_logits(model, idx, {12, 1}), full, 1e-10, 1e-10);
  }
}

TEST_CASE("cached decoding attends exactly the dilated key sets") {
  // A dilated model must not match vanilla attention: the cached path is not
  // dense attention in disguise.
  const Variant& dilated = kVariants[3];
  Variant vanilla = kVariants[1];
  nn::TransformerLM a(config_for(dilated, 16, 13), 3, {DType::Float64});
  nn::TransformerLM b(config_for(vanilla, 16, 13), 3, {DType::Float64});
  randomize(a, 1.0);
  b.load_state_dict(a.state_dict());
  a.eval();
  b.eval();
  Tensor idx = random_ids(1, 13, 11, 9);
  std::vector<double> x = incremental_logits(a, idx, kChunks).to_vector<double>();
  std::vector<double> y = incremental_logits(b, idx, kChunks).to_vector<double>();
  double diff = 0;
  for (size_t i = 0; i < x.size(); ++i) diff = std::max(diff, std::abs(x[i] - y[i]));
  CHECK(diff > 1e-3);
}

TEST_CASE("generate draws each id from the full forward of its window, past the context") {
  for (const Variant& variant : {kVariants[0], kVariants[3]}) {
    CAPTURE(variant.name);
    nn::TransformerLM model(config_for(variant, 16, 7), 5, {DType::Float64});
    randomize(model, 1.0);
    model.eval();
    for (std::vector<int32_t> prompt : {std::vector<int32_t>{1, 2, 3}, std::vector<int32_t>(10, 4)}) {
      std::vector<std::vector<float>> seen;
      auto greedy = [&](const std::vector<float>& logits) {
        seen.push_back(logits);
        return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      };
      std::vector<int32_t> out = model.generate(prompt, 20, greedy);
      REQUIRE(out.size() == prompt.size() + 20);
      REQUIRE(seen.size() == 20);
      // The documented window: the latest ids, up to block_size (7); when
      // full, it restarts from its last 7 / 2 = 3 ids.
      int64_t window = std::min<int64_t>(static_cast<int64_t>(prompt.size()), 7);
      for (size_t i = 0; i < 20; ++i) {
        const size_t end = prompt.size() + i;
        std::vector<int32_t> ids(out.begin() + static_cast<std::ptrdiff_t>(end) - window,
                                 out.begin() + static_cast<std::ptrdiff_t>(end));
        Tensor logits = model.forward(from_vector(ids, {1, window})).narrow(1, window - 1, 1);
        check_close(from_vector(seen[i], {1, 1, 11}), logits.to(DType::Float32), 1e-5, 1e-5);
        CHECK(out[end] == ops::argmax(logits.reshape({11}), 0).item<int32_t>());
        window = window < 7 ? window + 1 : 3;
      }
    }
  }
}

namespace {
// A custom layer with forward(x) only: cached decoding replays its inputs.
class ReplayAttention : public nn::AttentionLayer {
 public:
  explicit ReplayAttention(const nn::AttentionInit& init)
      : AttentionLayer("ReplayAttention") {
    inner = register_module("inner", std::make_shared<nn::CausalSelfAttention>(init));
  }
  Tensor forward(const Tensor& x) override { return inner->forward(x); }
  std::shared_ptr<nn::CausalSelfAttention> inner;
};
}  // namespace

TEST_CASE("attention layers without a key/value path decode by replaying their inputs") {
  nn::register_attention("replay-test", [](const nn::AttentionInit& init) {
    return std::make_shared<ReplayAttention>(init);
  });
  Variant variant = kVariants[1];
  variant.attention = "replay-test";
  nn::TransformerLM model(config_for(variant, 16, 13), 3, {DType::Float64});
  randomize(model, 1.0);
  model.eval();
  Tensor idx = random_ids(2, 13, 11, 11);
  check_close(incremental_logits(model, idx, kChunks), model.forward(idx), 1e-10, 1e-10);
}

TEST_CASE("cached forward errors") {
  nn::TransformerLM model(config_for(kVariants[2], 16, 13), 3);
  nn::KVCache cache;
  CHECK_THROWS_WITH_AS(model.forward(random_ids(1, 3, 11, 1), cache),
                       doctest::Contains("cached decoding runs without dropout; call eval() first"),
                       Error);
  model.eval();
  model.forward(random_ids(2, 10, 11, 1), cache);
  CHECK_THROWS_WITH_AS(model.forward(random_ids(2, 4, 11, 1), cache),
                       doctest::Contains("cached forward of 4 positions after 10 cached ones: need "
                                         "1 <= T and cached + T <= block_size = 13"),
                       Error);
  CHECK_THROWS_WITH_AS(model.forward(random_ids(1, 1, 11, 1), cache),
                       doctest::Contains("input batch 1 differs from the cached batch 2"), Error);
  cache.clear();
  CHECK(model.forward(random_ids(1, 13, 11, 1), cache).shape() == Shape{1, 13, 11});
}

TEST_CASE("CUDA cached forward equals the full forward at bf16 tolerance") {
  MINIDL_REQUIRE_CUDA();
  // Head dim 32 (the CUDA attention kernels take 32, 64 or 128); 37
  // positions: no segment length divides it, and 64 exceeds it.
  const std::vector<Variant> variants = {
      {"vanilla learned", "causal", "", "", "learned"},
      {"vanilla rope", "causal", "", "", "rope"},
      {"dilated learned", "dilated", "8,12,64", "1,2,3", "learned"},
      {"dilated rope", "dilated", "8,12,64", "1,2,3", "rope"},
      {"dilated rope, rows kept nowhere", "dilated", "6,16", "2,5", "rope"},
  };
  for (const Variant& variant : variants) {
    CAPTURE(variant.name);
    nn::TransformerLM model(config_for(variant, 128, 37), 3);
    randomize(model, 0.5);
    model.eval();
    model.to(Device::cuda());
    model.to(DType::BFloat16);
    Tensor idx = random_ids(2, 37, 11, 5).to(Device::cuda());
    Tensor full = model.forward(idx);
    // Prefill past the first segment boundaries, single ids, a chunk with a
    // filled cache across the w = 12 boundary at 24, single ids.
    std::vector<int64_t> chunks = {9};
    for (int i = 0; i < 13; ++i) chunks.push_back(1);
    chunks.push_back(5);
    for (int i = 0; i < 10; ++i) chunks.push_back(1);
    Tensor cached = incremental_logits(model, idx, chunks);
    // bf16 rounding differs between the fused op and the fp32 cached path:
    // a tolerance relative to the largest logit.
    std::vector<double> y = full.to_vector<double>();
    double scale = 0;
    for (double e : y) scale = std::max(scale, std::abs(e));
    CHECK(scale > 1.0);
    check_close(cached, full, 3e-2 * scale, 3e-2);
  }
}
