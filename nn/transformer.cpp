#include "nn/transformer.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>
#include <tuple>

#include "autograd/grad_mode.h"
#include "ops/ops.h"

namespace minidl::nn {

// ---- TransformerLMConfig ----

void TransformerLMConfig::validate() const {
  MINIDL_CHECK(vocab_size > 0, "TransformerLMConfig: vocab_size must be positive, got ", vocab_size);
  MINIDL_CHECK(n_layer > 0, "TransformerLMConfig: n_layer must be positive, got ", n_layer);
  MINIDL_CHECK(n_head > 0 && n_embd > 0 && n_embd % n_head == 0, "TransformerLMConfig: n_embd ",
               n_embd, " must be a positive multiple of n_head ", n_head);
  MINIDL_CHECK(block_size > 0, "TransformerLMConfig: block_size must be positive, got ", block_size);
  MINIDL_CHECK(dropout >= 0 && dropout < 1, "TransformerLMConfig: dropout must be in [0, 1), got ",
               dropout);
  MINIDL_CHECK(position_embedding == "learned" || position_embedding == "none" ||
                   position_embedding == "rope",
               "TransformerLMConfig: position_embedding must be \"learned\", \"none\" or "
               "\"rope\", got \"",
               position_embedding, "\"");
}

namespace {
const char* kAttentionOptionPrefix = "model.attention.";

std::string format_double(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

const std::string& required(const Metadata& m, const std::string& key) {
  auto it = m.find(key);
  MINIDL_CHECK(it != m.end(), "TransformerLMConfig::from_metadata: missing key '", key, "'");
  return it->second;
}

int64_t parse_int(const Metadata& m, const std::string& key) {
  const std::string& text = required(m, key);
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MINIDL_CHECK(used == text.size() && !text.empty(), "TransformerLMConfig::from_metadata: key '",
               key, "' is not an integer: '", text, "'");
  return v;
}

double parse_double(const Metadata& m, const std::string& key) {
  const std::string& text = required(m, key);
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MINIDL_CHECK(used == text.size() && !text.empty(), "TransformerLMConfig::from_metadata: key '",
               key, "' is not a number: '", text, "'");
  return v;
}

bool parse_bool(const Metadata& m, const std::string& key) {
  const std::string& text = required(m, key);
  MINIDL_CHECK(text == "true" || text == "false", "TransformerLMConfig::from_metadata: key '", key,
               "' must be true or false, got '", text, "'");
  return text == "true";
}
}  // namespace

Metadata TransformerLMConfig::to_metadata() const {
  Metadata m;
  m["model.vocab_size"] = std::to_string(vocab_size);
  m["model.n_layer"] = std::to_string(n_layer);
  m["model.n_head"] = std::to_string(n_head);
  m["model.n_embd"] = std::to_string(n_embd);
  m["model.block_size"] = std::to_string(block_size);
  m["model.dropout"] = format_double(dropout);
  m["model.bias"] = bias ? "true" : "false";
  m["model.tie_weights"] = tie_weights ? "true" : "false";
  m["model.attention"] = attention;
  m["model.position_embedding"] = position_embedding;
  for (const auto& [key, value] : attention_options) m[kAttentionOptionPrefix + key] = value;
  return m;
}

TransformerLMConfig TransformerLMConfig::from_metadata(const Metadata& m) {
  TransformerLMConfig c;
  c.vocab_size = parse_int(m, "model.vocab_size");
  c.n_layer = parse_int(m, "model.n_layer");
  c.n_head = parse_int(m, "model.n_head");
  c.n_embd = parse_int(m, "model.n_embd");
  c.block_size = parse_int(m, "model.block_size");
  c.dropout = parse_double(m, "model.dropout");
  c.bias = parse_bool(m, "model.bias");
  c.tie_weights = parse_bool(m, "model.tie_weights");
  c.attention = required(m, "model.attention");
  c.position_embedding = required(m, "model.position_embedding");
  const std::string prefix = kAttentionOptionPrefix;
  for (auto it = m.lower_bound(prefix); it != m.end() && it->first.rfind(prefix, 0) == 0; ++it)
    c.attention_options[it->first.substr(prefix.size())] = it->second;
  c.validate();
  return c;
}

// ---- TransformerBlock ----

TransformerBlock::TransformerBlock(const TransformerLMConfig& config, int64_t layer,
                                   Generator& init_gen, Generator* dropout_gen, TensorOptions options)
    : Module("TransformerBlock") {
  config.validate();
  // GPT-2's scaled init: each block adds two residual projections.
  const double proj_std = kDefaultInitStd / std::sqrt(2.0 * static_cast<double>(config.n_layer));
  ln_1 = register_module("ln_1", std::make_shared<LayerNorm>(config.n_embd, config.bias, options));
  attn = register_module(
      "attn", make_attention({config, layer, init_gen, dropout_gen, options, proj_std}));
  ln_2 = register_module("ln_2", std::make_shared<LayerNorm>(config.n_embd, config.bias, options));
  mlp = register_module("mlp", std::make_shared<MLP>(config.n_embd, config.bias, config.dropout,
                                                     init_gen, dropout_gen, options, proj_std));
}

namespace {
// {residual + drop(branch), ln of that}: one op. drop null: none.
std::pair<Tensor, Tensor> add_and_norm(const Tensor& residual, const Tensor& branch, const Dropout* drop,
                                       const LayerNorm& ln) {
  const bool training = drop && drop->is_training();
  return ops::dropout_add_layer_norm(branch, residual, ln.weight, ln.bias, training ? drop->p : 0.0, training,
                                     drop ? drop->gen : nullptr, ln.eps);
}

// {x + attn(x_ln), ln_2 of that}. The built-in attention layers leave their
// residual dropout to the fused op; any other layer applies its own. The
// generator gives out offsets in the unfused order (attention, its residual
// dropout, then the MLP's), so the masks are the same.
std::pair<Tensor, Tensor> attention_residual(const TransformerBlock& block, const Tensor& x, const Tensor& x_ln) {
  auto* mhsa = dynamic_cast<MultiHeadSelfAttention*>(block.attn.get());
  Tensor a = mhsa ? mhsa->forward_before_dropout(x_ln) : block.attn->forward(x_ln);
  return add_and_norm(x, a, mhsa ? mhsa->resid_drop.get() : nullptr, *block.ln_2);
}
}  // namespace

Tensor TransformerBlock::forward(const Tensor& x) const {
  auto [h1, h1_ln] = attention_residual(*this, x, ln_1->forward(x));
  return ops::add(h1, mlp->forward(h1_ln));
}

std::pair<Tensor, Tensor> TransformerBlock::forward(const Tensor& x, const Tensor& x_ln,
                                                    const LayerNorm& next_ln) const {
  auto [h1, h1_ln] = attention_residual(*this, x, x_ln);
  return add_and_norm(h1, mlp->forward_before_dropout(h1_ln), mlp->drop.get(), next_ln);
}

Tensor TransformerBlock::forward(const Tensor& x, AttentionCache& cache) const {
  Tensor h1 = ops::add(x, attn->forward(ln_1->forward(x), cache));
  return ops::add(h1, mlp->forward(ln_2->forward(h1)));
}

// ---- TransformerLM ----

namespace {
// Keeps the dropout stream apart from the init stream of the same seed.
constexpr uint64_t kDropoutSeedSalt = 0x9e3779b97f4a7c15ull;
}  // namespace

TransformerLM::TransformerLM(const TransformerLMConfig& config, uint64_t seed,
                                 TensorOptions options)
    : Module("TransformerLM"), config_(config), dropout_gen_(seed ^ kDropoutSeedSalt) {
  config_.validate();
  Generator init_gen(seed);
  wte = register_module("wte", std::make_shared<Embedding>(config_.vocab_size, config_.n_embd,
                                                           init_gen, options));
  if (config_.position_embedding == "learned")
    wpe = register_module("wpe", std::make_shared<Embedding>(config_.block_size, config_.n_embd,
                                                             init_gen, options));
  drop = register_module("drop", std::make_shared<Dropout>(config_.dropout, &dropout_gen_));
  // Blocks register under "h.<i>"; a container module keeps the names dotted.
  auto blocks = register_module("h", std::make_shared<Module>("ModuleList"));
  for (int64_t i = 0; i < config_.n_layer; ++i)
    h.push_back(blocks->register_module(
        std::to_string(i),
        std::make_shared<TransformerBlock>(config_, i, init_gen, &dropout_gen_, options)));
  ln_f = register_module("ln_f", std::make_shared<LayerNorm>(config_.n_embd, config_.bias, options));
  if (!config_.tie_weights)
    lm_head = register_module("lm_head", std::make_shared<Linear>(config_.n_embd, config_.vocab_size,
                                                                  false, init_gen, options));
}

namespace {
void check_ids(const Tensor& idx) {
  MINIDL_CHECK(idx.defined() && idx.dim() == 2 && idx.dtype() == DType::Int32,
               "TransformerLM: expected int32 token ids (B, T), got ",
               idx.defined() ? ::minidl::detail::concat(idx.dtype(), " ", shape_str(idx.shape()))
                             : std::string("an undefined tensor"));
}
}  // namespace

Tensor TransformerLM::embed(const Tensor& idx, int64_t position) const {
  // Position embeddings of position.. are rows of wpe: a view, no index
  // tensor, broadcast over the batch. Token lookup, position add and dropout
  // are one op (one kernel on CUDA).
  const Tensor positions = wpe ? wpe->weight.narrow(0, position, idx.size(1)) : Tensor();
  return ops::embedding_dropout(wte->weight, idx, positions, drop->p, drop->is_training(), drop->gen);
}

Tensor TransformerLM::head(const Tensor& x_ln) const {
  return lm_head ? lm_head->forward(x_ln) : ops::linear(x_ln, wte->weight);
}

void TransformerLM::set_sequence_parallel(const SequenceParallel& sp) {
  // With a layout (the same on every rank) each rank's chunk is checked here,
  // by all ranks alike: forward's per-rank length check would throw on one
  // rank while the others wait in the attention's collectives.
  if (sp.layout()) {
    const std::vector<int64_t>& sizes = sp.layout()->chunk_sizes;
    int64_t total = 0;
    for (int64_t n : sizes) {
      MINIDL_CHECK(n >= 1, "TransformerLM::set_sequence_parallel: layout ", shape_str(sizes),
                   " has an empty chunk; every rank needs at least one position");
      total += n;
    }
    MINIDL_CHECK(total <= config_.block_size, "TransformerLM::set_sequence_parallel: layout ", shape_str(sizes),
                 " covers ", total, " positions, more than block_size = ", config_.block_size);
  }
  for (const auto& block : h) {
    auto* mhsa = dynamic_cast<MultiHeadSelfAttention*>(block->attn.get());
    MINIDL_CHECK(mhsa || !sp.comm(), "TransformerLM::set_sequence_parallel: attention '", config_.attention,
                 "' (", block->attn->type_name(), ") is not a MultiHeadSelfAttention");
    if (mhsa) mhsa->sequence_parallel = sp;
  }
  sequence_parallel_ = sp;
}

Tensor TransformerLM::forward(const Tensor& idx) const {
  check_ids(idx);
  const int64_t T = idx.size(1), position = sequence_parallel_.offset();
  MINIDL_CHECK(T >= 1 && T <= config_.block_size - position, "TransformerLM: sequence length ", T,
               position ? ::minidl::detail::concat(" at position ", position) : std::string(),
               " must be in [1, block_size = ", config_.block_size,
               position ? ::minidl::detail::concat(" - ", position) : std::string(), "]");
  Tensor x = embed(idx, position);
  // Each block's second residual add runs fused with the LayerNorm after it.
  Tensor x_ln = h[0]->ln_1->forward(x);
  for (size_t i = 0; i < h.size(); ++i)
    std::tie(x, x_ln) = h[i]->forward(x, x_ln, i + 1 < h.size() ? *h[i + 1]->ln_1 : *ln_f);
  return head(x_ln);
}

Tensor TransformerLM::forward(const Tensor& idx, KVCache& cache) const {
  check_ids(idx);
  const int64_t T = idx.size(1), position = cache.length;
  MINIDL_CHECK(T >= 1 && position >= 0 && T <= config_.block_size - position,
               "TransformerLM: cached forward of ", T, " positions after ", position,
               " cached ones: need 1 <= T and cached + T <= block_size = ", config_.block_size);
  MINIDL_CHECK(!is_training() || config_.dropout == 0,
               "TransformerLM: cached decoding runs without dropout; call eval() first");
  MINIDL_CHECK(!sequence_parallel_.comm(), "TransformerLM: cached decoding is not sequence parallel");
  MINIDL_CHECK(cache.layers.empty() || cache.layers.size() == h.size(), "TransformerLM: the cache "
               "holds ", cache.layers.size(), " layers, the model ", h.size());
  NoGradGuard no_grad;
  cache.layers.resize(h.size());
  Tensor x = embed(idx, position);
  for (size_t i = 0; i < h.size(); ++i) x = h[i]->forward(x, cache.layers[i]);
  cache.length = position + T;
  return head(ln_f->forward(x));
}

Tensor TransformerLM::loss(const Tensor& idx, const Tensor& targets) const {
  MINIDL_CHECK(targets.defined() && targets.shape() == idx.shape() && targets.dtype() == DType::Int32,
               "TransformerLM::loss: targets must be int32 of the ids' shape ",
               shape_str(idx.shape()), ", got ",
               targets.defined() ? ::minidl::detail::concat(targets.dtype(), " ", shape_str(targets.shape()))
                                 : std::string("an undefined tensor"));
  Tensor logits = forward(idx);
  const int64_t N = idx.numel();
  return ops::cross_entropy(logits.reshape({N, config_.vocab_size}), targets.reshape({N}));
}

void check_state_dict(const TransformerLMConfig& config, const StateDict& weights) {
  config.validate();
  const int64_t V = config.vocab_size, C = config.n_embd;
  const char* where = "check_state_dict: the weights do not fit the config";
  // name must hold a tensor of `shape` exactly when `present`.
  using ::minidl::detail::concat;
  auto expect = [&](const std::string& name, bool present, const Shape& shape,
                    const std::string& fields) {
    const Tensor* t = weights.find(name);
    MINIDL_CHECK(present == (t != nullptr), where, ": ", name,
                 present ? " is missing" : " is present", " (", fields, ")");
    MINIDL_CHECK(!t || t->shape() == shape, where, ": ", name, " is ", shape_str(t->shape()),
                 ", expected ", shape_str(shape), " (", fields, ")");
  };
  expect("wte.weight", true, {V, C}, concat("vocab_size ", V, ", n_embd ", C));
  expect("wpe.weight", config.position_embedding == "learned", {config.block_size, C},
         concat("position_embedding ", config.position_embedding, ", block_size ", config.block_size,
                ", n_embd ", C));
  expect("lm_head.weight", !config.tie_weights, {V, C},
         concat("tie_weights ", config.tie_weights ? "true" : "false", ", vocab_size ", V,
                ", n_embd ", C));
  // The blocks present: "h.<i>.<rest>" with i a decimal index.
  std::set<int64_t> blocks;
  for (const auto& [name, tensor] : weights) {
    if (name.rfind("h.", 0) != 0) continue;
    const size_t dot = name.find('.', 2);
    const std::string index = name.substr(2, dot == std::string::npos ? std::string::npos : dot - 2);
    MINIDL_CHECK(!index.empty() && index.size() <= 18 &&
                     index.find_first_not_of("0123456789") == std::string::npos,
                 where, ": unexpected tensor ", name, " (blocks are h.<index>.*)");
    blocks.insert(std::stoll(index));
  }
  const int64_t found = static_cast<int64_t>(blocks.size());
  MINIDL_CHECK(found == config.n_layer && (blocks.empty() || *blocks.rbegin() == found - 1), where,
               ": n_layer is ", config.n_layer, " but the weights hold ", found, " blocks",
               found ? concat(" (h.", *blocks.begin(), " .. h.", *blocks.rbegin(), ")") : std::string());
  for (int64_t i = 0; i < config.n_layer; ++i) {
    const std::string mlp = "h." + std::to_string(i) + ".mlp.";
    expect(mlp + "c_fc.weight", true, {4 * C, C}, concat("n_embd ", C));
    expect(mlp + "c_proj.weight", true, {C, 4 * C}, concat("n_embd ", C));
  }
}

std::vector<int32_t> TransformerLM::generate(
    std::vector<int32_t> tokens, int64_t max_new_tokens,
    const std::function<int32_t(const std::vector<float>&)>& sample) const {
  MINIDL_CHECK(!tokens.empty(), "TransformerLM::generate: the prompt must hold at least one token");
  if (max_new_tokens <= 0) return tokens;
  NoGradGuard no_grad;
  const Device device = wte->weight.device();
  KVCache cache;
  // Feeds the last n ids (after the cached ones); returns the last logits.
  auto feed = [&](int64_t n) {
    std::vector<int32_t> ids(tokens.end() - n, tokens.end());
    Tensor logits = forward(from_vector(ids, {1, n}, {DType::Int32, device, false}), cache);
    return logits.narrow(1, n - 1, 1).reshape({config_.vocab_size}).to(DType::Float32).to_vector<float>();
  };
  std::vector<float> logits = feed(std::min<int64_t>(static_cast<int64_t>(tokens.size()), config_.block_size));
  for (int64_t step = 0;; ++step) {
    int32_t next = sample(logits);
    MINIDL_CHECK(next >= 0 && next < config_.vocab_size, "TransformerLM::generate: sampled id ",
                 next, " is outside the vocabulary [0, ", config_.vocab_size, ")");
    tokens.push_back(next);
    if (step + 1 == max_new_tokens) return tokens;
    if (cache.length < config_.block_size) {
      logits = feed(1);
    } else {  // the window is full: restart it from its latest half
      cache.clear();
      logits = feed(std::max<int64_t>(1, config_.block_size / 2));
    }
  }
}

}  // namespace minidl::nn
