#pragma once
// Attention layers for the transformer blocks. A block holds an
// AttentionLayer, built by name from a registry, so variants (dilated
// attention, rotary embeddings) plug in without touching the blocks:
//
//   nn::register_attention("my-attention", [](const nn::AttentionInit& init) {
//     return std::make_shared<MyAttention>(init);
//   });
//   config.attention = "my-attention";
//
// Built in: "causal" (CausalSelfAttention, below) and "dilated"
// (DilatedAttention, nn/dilated_attention.h).
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/generator.h"
#include "dist/communicator.h"
#include "nn/layers.h"
#include "nn/transformer_config.h"
#include "ops/seq_parallel.h"

namespace minidl::nn {

// What one attention layer keeps between forward(x, cache) calls during
// incremental decoding (TransformerLM::forward(idx, cache) holds one per
// block). Buffers are allocated on first use and grow by doubling; only
// positions [0, length) are valid.
struct AttentionCache {
  // MultiHeadSelfAttention: keys (rotated under rope) and values,
  // (B, capacity, H, D), float32 for float32 and bfloat16 models (the fused
  // kernels' accumulation dtype, so a cached step scores in fp32 as they do),
  // float64 for float64 ones.
  Tensor k, v;
  // The AttentionLayer default: the layer's inputs (B, capacity, C).
  Tensor x;
  int64_t length = 0;  // positions cached
};

// (B, T, C) -> (B, T, C): causal self-attention over T, including its output
// projection (the residual add is the block's).
class AttentionLayer : public Module {
 public:
  using Module::Module;
  virtual Tensor forward(const Tensor& x) = 0;
  // Incremental decoding. x (B, T, C) holds positions cache.length ..
  // cache.length + T - 1 of a sequence whose earlier positions went through
  // this layer with `cache` (empty at first); returns their outputs, equal
  // to forward() of the whole sequence at those positions, and appends them
  // to the cache. Inference only: no dropout, no autograd needed. This
  // default keeps the inputs and re-runs forward() on all of them (exact for
  // any causal layer, but no faster); MultiHeadSelfAttention overrides it
  // with a key/value cache.
  virtual Tensor forward(const Tensor& x, AttentionCache& cache);
};

// What a factory gets to build the attention layer of block `layer`.
struct AttentionInit {
  const TransformerLMConfig& config;
  int64_t layer;
  Generator& init_gen;     // parameter initialisation
  Generator* dropout_gen;  // dropout masks (null: default_generator())
  TensorOptions options;   // parameter dtype and device
  double proj_init_std;    // for the output projection (0.02 / sqrt(2 n_layer))
};

using AttentionFactory = std::function<std::shared_ptr<AttentionLayer>(const AttentionInit&)>;

// Adds or replaces a named attention kind. Call before building a model; the
// registry is process-wide and not synchronised.
void register_attention(const std::string& name, AttentionFactory factory);
// Builds init.config.attention; throws listing the registered names if unknown.
std::shared_ptr<AttentionLayer> make_attention(const AttentionInit& init);
std::vector<std::string> registered_attentions();

// Rotary position embeddings (config.position_embedding == "rope"): the
// built-in layers apply ops::rope to q and k (positions 0..T-1) before
// attention, and the model has no learned position table. The angles' base
// is attention_options["rope_base"] when given, else this.
constexpr double kDefaultRopeBase = 10000.0;

// The rotary base the built-in layers use for `config`: nullopt unless
// position_embedding is "rope"; then attention_options["rope_base"] (a
// positive number; throws naming the key otherwise) or kDefaultRopeBase.
std::optional<double> rope_base_for(const TransformerLMConfig& config);

// The keys a causal attention layer gives each query, as LongNet branches
// (docs/dilated-attention.md): branch i splits the sequence into segments of
// segments[i] positions and keeps every dilations[i]-th one (head h at offset
// h mod r); a query attends the union (a multiset) of the kept keys at or
// before it in the segments of the branches that keep it. Vanilla causal
// attention is one branch {kWholeSequence, 1}.
struct AttentionBranches {
  std::vector<int64_t> segments, dilations;
  bool dropout_per_pair = false;  // ops::dilated_attention's
};
constexpr int64_t kWholeSequence = INT64_MAX;  // a segment longer than any sequence

// Sequence parallelism (LongNet; ops/seq_parallel.h): the ranks of `comm`
// each hold a contiguous chunk of every sequence, in rank order. A layer
// given one (comm() not null) rotates q and k for global positions and
// attends through ops::seq_parallel_dilated_attention with its branches(), a
// collective every rank of comm runs; comm must outlive the backward.
// Attention dropout as without it (the mask is the single-device op's for
// this rank's queries, drawn from resid_drop's generator); no cached decoding.
//
// Where this rank's chunk starts (offset()) comes from one place:
// - SequenceParallel(comm, layout): every rank passes the same layout (e.g.
//   ops::SequenceLayout::even); the chunk starts at layout.start(comm.rank()).
//   The attention exchanges no chunk sizes and, once its plan is built,
//   never waits on the host (ops::SequenceLayout); the call that builds the
//   plan checks every rank's chunk length against the layout, on all ranks
//   together.
// - SequenceParallel(comm, offset): the chunk starts at global position
//   `offset`, the sum of the lengths of the ranks' chunks before it (not
//   checked: a wrong one shifts this rank's positions); each call exchanges
//   the ranks' chunk lengths to learn the layout.
class SequenceParallel {
 public:
  SequenceParallel() = default;  // off: the whole sequence is here
  // Throws unless the layout has one chunk size >= 0 per rank of comm.
  SequenceParallel(dist::Communicator& comm, ops::SequenceLayout layout);
  // Throws unless offset >= 0.
  SequenceParallel(dist::Communicator& comm, int64_t offset);

  dist::Communicator* comm() const { return comm_; }  // null: off
  int64_t offset() const { return offset_; }
  const std::optional<ops::SequenceLayout>& layout() const { return layout_; }

 private:
  dist::Communicator* comm_ = nullptr;
  int64_t offset_ = 0;
  std::optional<ops::SequenceLayout> layout_;
};

// Multi-head self-attention with a fused QKV projection, the structure both
// built-in layers share (and their parameter names, so weights carry over):
// a Linear(C, 3C) c_attn whose output gives q, k, v as (B, T, H, D) views (no
// copy); with rope_base set, q and k are rotated by ops::rope(., position of
// the first row, *rope_base); attend() mixes them; heads merge back to
// (B, T, C), then the output projection c_proj and residual dropout. attend()
// gets the dropout p to apply to attention probabilities (the residual's p in
// training, as nanoGPT does; 0 in eval) and its generator.
//
// forward(x, cache) keeps k and v. A first call (empty cache) runs attend()
// on x, as forward(x) does; later calls attend, for each new query, over the
// cached keys that branches() names (a softmax over their multiset union,
// computed with ops::matmul and ops::softmax over the window of keys the
// query's segments cover): a step costs O(cached positions) with one dense
// branch, O(longest segment) with dilated branches.
class MultiHeadSelfAttention : public AttentionLayer {
 public:
  Tensor forward(const Tensor& x) final;
  // forward(x) before the residual dropout resid_drop, for a caller that
  // fuses that dropout into its residual add (TransformerBlock).
  Tensor forward_before_dropout(const Tensor& x);
  Tensor forward(const Tensor& x, AttentionCache& cache) override;

  int64_t n_embd, n_head;
  std::optional<double> rope_base;  // rotary q and k when set
  std::shared_ptr<Linear> c_attn, c_proj;
  std::shared_ptr<Dropout> resid_drop;
  SequenceParallel sequence_parallel;  // off by default (see SequenceParallel)

 protected:
  // Checks the sizes (errors start with type_name) and registers the
  // projections and the residual dropout.
  MultiHeadSelfAttention(std::string type_name, int64_t n_embd, int64_t n_head, bool bias,
                         double dropout, Generator& gen, Generator* dropout_gen,
                         TensorOptions options, double proj_init_std,
                         std::optional<double> rope_base);
  // q, k, v: (B, T, H, D) -> (B, T, H, D).
  virtual Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                        Generator* gen) = 0;
  // The keys attend() gives each query; forward(x, cache) attends exactly
  // these. (A subclass whose attend() has no such form overrides
  // forward(x, cache) with AttentionLayer's.)
  virtual AttentionBranches branches() const = 0;

 private:
  // q, k, v (B, T, H, D) of x, rotated for positions from `position`.
  std::vector<Tensor> project_qkv(const Tensor& x, int64_t position);
};

// Vanilla multi-head causal self-attention (registered as "causal"):
// ops::attention(q, k, v, causal), the fused attention op.
class CausalSelfAttention : public MultiHeadSelfAttention {
 public:
  CausalSelfAttention(int64_t n_embd, int64_t n_head, bool bias, double dropout, Generator& gen,
                      Generator* dropout_gen = nullptr, TensorOptions options = {},
                      double proj_init_std = kDefaultInitStd,
                      std::optional<double> rope_base = std::nullopt);
  explicit CausalSelfAttention(const AttentionInit& init);

 protected:
  Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                Generator* gen) override;
  AttentionBranches branches() const override { return {{kWholeSequence}, {1}}; }
};

}  // namespace minidl::nn
