#pragma once
// A GPT-style character language model (nanoGPT's architecture): token +
// learned position embeddings (or rotary ones inside the attention layers,
// config.position_embedding), n_layer pre-LayerNorm blocks, a final
// LayerNorm and an LM head (tied to the token embedding by default).
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "core/generator.h"
#include "nn/attention.h"
#include "nn/layers.h"
#include "nn/transformer_config.h"

namespace minidl::nn {

// x + attn(ln_1(x)), then x + mlp(ln_2(x)).
class TransformerBlock : public Module {
 public:
  // The attention layer comes from the registry (config.attention).
  TransformerBlock(const CharTransformerConfig& config, int64_t layer, Generator& init_gen,
                   Generator* dropout_gen = nullptr, TensorOptions options = {});
  Tensor forward(const Tensor& x) const;

  std::shared_ptr<LayerNorm> ln_1, ln_2;
  std::shared_ptr<AttentionLayer> attn;
  std::shared_ptr<MLP> mlp;
};

class CharTransformer : public Module {
 public:
  // Parameters are drawn from Generator(seed); dropout masks come from the
  // model's own dropout_generator() (seeded from `seed` too).
  explicit CharTransformer(const CharTransformerConfig& config, uint64_t seed = 1337,
                           TensorOptions options = {});

  // idx int32 (B, T), T <= block_size -> logits (B, T, vocab_size).
  Tensor forward(const Tensor& idx) const;
  // Mean cross-entropy of forward(idx) against int32 targets (B, T).
  Tensor loss(const Tensor& idx, const Tensor& targets) const;

  // Appends max_new_tokens ids to `prompt`, each picked by `sample` from the
  // float32 logits of the last position (vocab_size values on the host). The
  // context fed to the model is the last block_size ids. Runs without
  // recording autograd; call eval() first to disable dropout.
  std::vector<int32_t> generate(std::vector<int32_t> prompt, int64_t max_new_tokens,
                                const std::function<int32_t(const std::vector<float>&)>& sample) const;

  const CharTransformerConfig& config() const { return config_; }
  // The dropout mask stream; save/restore its state for exact resume.
  Generator& dropout_generator() { return dropout_gen_; }

  std::shared_ptr<Embedding> wte, wpe;  // wpe null unless position_embedding == "learned"
  std::shared_ptr<Dropout> drop;
  std::vector<std::shared_ptr<TransformerBlock>> h;
  std::shared_ptr<LayerNorm> ln_f;
  std::shared_ptr<Linear> lm_head;  // null when tie_weights (wte->weight is used)

 private:
  CharTransformerConfig config_;
  Generator dropout_gen_;
};

}  // namespace minidl::nn
