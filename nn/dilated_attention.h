#pragma once
// LongNet dilated multi-head self-attention as a transformer attention layer
// (registered as "dilated"; built by TransformerLM when config.attention ==
// "dilated"). A MultiHeadSelfAttention (nn/attention.h) like
// CausalSelfAttention, with the same parameter names, so checkpoints and
// weights carry over between the two; it mixes heads with
// ops::dilated_attention(q, k, v, segments, dilations, causal = true) (exact
// LongNet semantics, docs/dilated-attention.md).
//
// Branch i attends within segments of segments[i] positions, keeping every
// dilations[i]-th position (head h keeps offset h mod r). One branch with
// w >= T and r = 1 is vanilla causal attention. A row that no branch keeps
// for some head (e.g. no branch has r = 1) gets a zero attention output
// there; include a branch with r = 1 for full coverage.
//
// Options read from config.attention_options (the checkpoint metadata keeps
// them as "model.attention.<key>"):
//   "segments"   comma-separated segment lengths w_i >= 1, e.g. "64,128,256"
//   "dilations"  comma-separated dilations r_i >= 1, one per segment, e.g. "1,2,4"
//   "rope_base"  optional rotary base when position_embedding == "rope"
//                (default kDefaultRopeBase)
//   "dropout"    optional: how attention dropout treats a pair that nested
//                branches share: "per_copy" (default: each branch's copy on
//                its own) or "per_pair" (once for all copies, the branches
//                nesting at block_size; ops::dilated_attention's
//                dropout_per_pair)
// Any other key is an error (catches typos such as "dilation").
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "nn/attention.h"

namespace minidl::nn {

// Parses "64,128,256" (spaces around entries allowed) into positive
// integers; errors name `key` and the offending text.
std::vector<int64_t> parse_attention_int_list(const std::string& key, const std::string& text);

class DilatedAttention : public MultiHeadSelfAttention {
 public:
  DilatedAttention(int64_t n_embd, int64_t n_head, std::vector<int64_t> segments,
                   std::vector<int64_t> dilations, bool bias, double dropout, Generator& gen,
                   Generator* dropout_gen = nullptr, TensorOptions options = {},
                   double proj_init_std = kDefaultInitStd,
                   std::optional<double> rope_base = std::nullopt);
  // From config.n_embd, n_head, bias, dropout and the attention options above.
  explicit DilatedAttention(const AttentionInit& init);

  std::vector<int64_t> segments, dilations;
  bool dropout_per_pair = false;  // the "dropout" option's "per_pair"

 private:
  struct Options;  // the attention options, parsed once (nn/dilated_attention.cpp)
  static Options parse_options(const TransformerLMConfig& config);
  DilatedAttention(const AttentionInit& init, const Options& parsed);

 protected:
  Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                Generator* gen) override;
  AttentionBranches branches() const override { return {segments, dilations, dropout_per_pair}; }
};

}  // namespace minidl::nn
