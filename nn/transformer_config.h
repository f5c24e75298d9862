#pragma once
// The hyper-parameters of TransformerLM, kept apart from the layers so the
// attention registry and checkpoint code can use them without the model.
#include <cstdint>
#include <map>
#include <string>

namespace minidl::nn {

using Metadata = std::map<std::string, std::string>;

struct TransformerLMConfig {
  int64_t vocab_size = 0;
  int64_t n_layer = 6;
  int64_t n_head = 6;
  int64_t n_embd = 384;
  int64_t block_size = 256;  // longest context (learned position embeddings)
  double dropout = 0.0;
  bool bias = true;         // biases in Linear and LayerNorm layers
  bool tie_weights = true;  // LM head shares the token embedding (as nanoGPT)
  // Which attention layer the blocks use: a name in the attention registry
  // (nn/attention.h). "causal" and "dilated" are built in; other kinds
  // register their own, reading their settings from attention_options.
  // Rotary embeddings are position_embedding = "rope", in any kind.
  std::string attention = "causal";
  std::map<std::string, std::string> attention_options;
  // "learned": a (block_size, n_embd) position embedding added to the token
  // embedding; "none": no position embedding (the attention layer encodes
  // positions itself); "rope": no position table, and the built-in attention
  // layers rotate q and k by position (ops::rope; base from
  // attention_options["rope_base"], default 10000), so nothing limits the
  // context but block_size, which then costs no parameters.
  std::string position_embedding = "learned";

  // Throws minidl::Error naming the field when a value is out of range
  // (e.g. n_embd not divisible by n_head).
  void validate() const;

  // String form for checkpoint metadata: keys "model.<field>" and
  // "model.attention.<option>"; from_metadata reads them back and throws
  // naming a missing or malformed key.
  Metadata to_metadata() const;
  static TransformerLMConfig from_metadata(const Metadata& metadata);
};

}  // namespace minidl::nn
