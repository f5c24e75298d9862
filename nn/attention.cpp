#include "nn/attention.h"

#include <map>
#include <sstream>

#include "ops/ops.h"

namespace minidl::nn {
namespace {

std::map<std::string, AttentionFactory>& registry() {
  // Built on first use, so registering from another translation unit's
  // static initialiser is safe.
  static std::map<std::string, AttentionFactory> factories = {
      {"causal", [](const AttentionInit& init) -> std::shared_ptr<AttentionLayer> {
         return std::make_shared<CausalSelfAttention>(init);
       }}};
  return factories;
}

}  // namespace

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

CausalSelfAttention::CausalSelfAttention(int64_t n_embd_, int64_t n_head_, bool bias, double dropout,
                                         Generator& gen, Generator* dropout_gen,
                                         TensorOptions options, double proj_init_std)
    : AttentionLayer("CausalSelfAttention"), n_embd(n_embd_), n_head(n_head_) {
  MINIDL_CHECK(n_head > 0 && n_embd > 0 && n_embd % n_head == 0, "CausalSelfAttention: n_embd ",
               n_embd, " must be a positive multiple of n_head ", n_head);
  c_attn = register_module("c_attn", std::make_shared<Linear>(n_embd, 3 * n_embd, bias, gen, options));
  c_proj = register_module("c_proj", std::make_shared<Linear>(n_embd, n_embd, bias, gen, options,
                                                              proj_init_std));
  resid_drop = register_module("resid_drop", std::make_shared<Dropout>(dropout, dropout_gen));
}

CausalSelfAttention::CausalSelfAttention(const AttentionInit& init)
    : CausalSelfAttention(init.config.n_embd, init.config.n_head, init.config.bias,
                          init.config.dropout, init.init_gen, init.dropout_gen, init.options,
                          init.proj_init_std) {}

Tensor CausalSelfAttention::forward(const Tensor& x) {
  MINIDL_CHECK(x.dim() == 3 && x.size(2) == n_embd, "CausalSelfAttention: expected input (B, T, ",
               n_embd, "), got ", shape_str(x.shape()));
  const int64_t B = x.size(0), T = x.size(1), H = n_head, D = n_embd / n_head;
  Tensor qkv = c_attn->forward(x);  // (B, T, 3C), contiguous
  // Each of q, k, v is a (B, T, H, D) view into qkv with row stride 3C.
  auto head_view = [&](int64_t which) { return qkv.narrow(2, which * n_embd, n_embd).view({B, T, H, D}); };
  Tensor y = ops::attention(head_view(0), head_view(1), head_view(2), /*causal=*/true);
  return resid_drop->forward(c_proj->forward(y.reshape({B, T, n_embd})));
}

}  // namespace minidl::nn
