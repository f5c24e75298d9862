#include "nn/attention.h"

#include <cmath>
#include <map>
#include <sstream>

#include "nn/dilated_attention.h"
#include "ops/ops.h"

namespace minidl::nn {
namespace {

std::map<std::string, AttentionFactory>& registry() {
  // Built on first use, so registering from another translation unit's
  // static initialiser is safe. The built-in kinds are listed here rather
  // than registered by static initialisers in their own files: minidl is a
  // static library, and the linker would drop an object file nothing refers to.
  static std::map<std::string, AttentionFactory> factories = {
      {"causal",
       [](const AttentionInit& init) -> std::shared_ptr<AttentionLayer> {
         return std::make_shared<CausalSelfAttention>(init);
       }},
      {"dilated", [](const AttentionInit& init) -> std::shared_ptr<AttentionLayer> {
         return std::make_shared<DilatedAttention>(init);
       }}};
  return factories;
}

}  // namespace

std::optional<double> rope_base_for(const CharTransformerConfig& config) {
  if (config.position_embedding != "rope") return std::nullopt;
  auto it = config.attention_options.find("rope_base");
  if (it == config.attention_options.end()) return kDefaultRopeBase;
  const std::string& text = it->second;
  size_t used = 0;
  double base = 0;
  try {
    base = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MINIDL_CHECK(used == text.size() && !text.empty() && std::isfinite(base) && base > 0,
               "attention option 'rope_base' must be a positive number, got '", text, "'");
  return base;
}

void register_attention(const std::string& name, AttentionFactory factory) {
  MINIDL_CHECK(!name.empty() && factory, "register_attention: need a name and a factory");
  registry()[name] = std::move(factory);
}

std::vector<std::string> registered_attentions() {
  std::vector<std::string> names;
  for (const auto& item : registry()) names.push_back(item.first);
  return names;
}

std::shared_ptr<AttentionLayer> make_attention(const AttentionInit& init) {
  auto it = registry().find(init.config.attention);
  if (it == registry().end()) {
    std::ostringstream known;
    for (const std::string& name : registered_attentions()) known << " '" << name << "'";
    MINIDL_FAIL("make_attention: unknown attention '", init.config.attention, "'; registered:",
                known.str());
  }
  std::shared_ptr<AttentionLayer> layer = it->second(init);
  MINIDL_CHECK(layer != nullptr, "make_attention: the factory for '", init.config.attention,
               "' returned null");
  return layer;
}

MultiHeadSelfAttention::MultiHeadSelfAttention(std::string type_name, int64_t n_embd_, int64_t n_head_,
                                               bool bias, double dropout, Generator& gen,
                                               Generator* dropout_gen, TensorOptions options,
                                               double proj_init_std, std::optional<double> rope_base_)
    : AttentionLayer(std::move(type_name)), n_embd(n_embd_), n_head(n_head_), rope_base(rope_base_) {
  const std::string& name = this->type_name();
  MINIDL_CHECK(n_head > 0 && n_embd > 0 && n_embd % n_head == 0, name, ": n_embd ", n_embd,
               " must be a positive multiple of n_head ", n_head);
  MINIDL_CHECK(!rope_base || (std::isfinite(*rope_base) && *rope_base > 0), name,
               ": rope_base must be positive and finite, got ", *rope_base);
  MINIDL_CHECK(!rope_base || (n_embd / n_head) % 2 == 0, name, ": rotary embeddings need an even "
               "head dim, got n_embd ", n_embd, " / n_head ", n_head, " = ", n_embd / n_head);
  c_attn = register_module("c_attn", std::make_shared<Linear>(n_embd, 3 * n_embd, bias, gen, options));
  c_proj = register_module("c_proj", std::make_shared<Linear>(n_embd, n_embd, bias, gen, options,
                                                              proj_init_std));
  resid_drop = register_module("resid_drop", std::make_shared<Dropout>(dropout, dropout_gen));
}

Tensor MultiHeadSelfAttention::forward(const Tensor& x) {
  MINIDL_CHECK(x.dim() == 3 && x.size(2) == n_embd, type_name(), ": expected input (B, T, ", n_embd,
               "), got ", shape_str(x.shape()));
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  Tensor qkv = c_attn->forward(x);  // (B, T, 3C), contiguous
  // Each of q, k, v is a (B, T, H, D) view into qkv with row stride 3C.
  // split records one node, so backward assembles d(qkv) with one concatenation.
  std::vector<Tensor> parts = ops::split(qkv, C, 2);
  auto heads = [&](size_t which) { return parts[which].view({B, T, n_head, C / n_head}); };
  Tensor q = heads(0), k = heads(1), v = heads(2);
  if (rope_base) {
    q = ops::rope(q, 0, *rope_base);
    k = ops::rope(k, 0, *rope_base);
  }
  // Attention-probability dropout with the residual's p and generator, as nanoGPT does.
  Tensor y = attend(q, k, v, is_training() ? resid_drop->p : 0.0, resid_drop->gen);
  return resid_drop->forward(c_proj->forward(y.reshape(x.shape())));
}

CausalSelfAttention::CausalSelfAttention(int64_t n_embd, int64_t n_head, bool bias, double dropout,
                                         Generator& gen, Generator* dropout_gen,
                                         TensorOptions options, double proj_init_std,
                                         std::optional<double> rope_base)
    : MultiHeadSelfAttention("CausalSelfAttention", n_embd, n_head, bias, dropout, gen, dropout_gen,
                             options, proj_init_std, rope_base) {}

CausalSelfAttention::CausalSelfAttention(const AttentionInit& init)
    : CausalSelfAttention(init.config.n_embd, init.config.n_head, init.config.bias,
                          init.config.dropout, init.init_gen, init.dropout_gen, init.options,
                          init.proj_init_std, rope_base_for(init.config)) {}

Tensor CausalSelfAttention::attend(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                                   Generator* gen) {
  return ops::attention(q, k, v, /*causal=*/true, /*scale=*/0, dropout_p, gen);
}

}  // namespace minidl::nn
