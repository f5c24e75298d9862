#pragma once
// A GPT-style language model over any token vocabulary (nanoGPT's architecture; charlm
// feeds it characters): token +
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
#include "nn/state_dict.h"
#include "nn/transformer_config.h"

namespace minidl::nn {

// x + attn(ln_1(x)), then x + mlp(ln_2(x)). Each residual dropout and add
// runs fused with the LayerNorm that reads the sum
// (ops::dropout_add_layer_norm): the same values and dropout masks as the
// ops one by one, fewer kernels.
class TransformerBlock : public Module {
 public:
  // The attention layer comes from the registry (config.attention).
  TransformerBlock(const TransformerLMConfig& config, int64_t layer, Generator& init_gen,
                   Generator* dropout_gen = nullptr, TensorOptions options = {});
  Tensor forward(const Tensor& x) const;
  // For a stack of blocks: x_ln is ln_1(x) (the previous block's second
  // result), next_ln the LayerNorm that reads this block's output (the next
  // block's ln_1, or the final one). Returns {forward(x), next_ln(forward(x))}
  // with the second residual add fused with next_ln too.
  std::pair<Tensor, Tensor> forward(const Tensor& x, const Tensor& x_ln, const LayerNorm& next_ln) const;
  // Incremental decoding through attn->forward(x, cache) (nn/attention.h).
  Tensor forward(const Tensor& x, AttentionCache& cache) const;

  std::shared_ptr<LayerNorm> ln_1, ln_2;
  std::shared_ptr<AttentionLayer> attn;
  std::shared_ptr<MLP> mlp;
};

// The state of incremental decoding for one batch of sequences: one
// AttentionCache per block. Start from KVCache{} (or clear()); the buffers
// are allocated on first use.
struct KVCache {
  std::vector<AttentionCache> layers;
  int64_t length = 0;  // positions cached; the next ids are at this position

  void clear() {
    layers.clear();
    length = 0;
  }
};

class TransformerLM : public Module {
 public:
  // Parameters are drawn from Generator(seed); dropout masks come from the
  // model's own dropout_generator() (seeded from `seed` too).
  explicit TransformerLM(const TransformerLMConfig& config, uint64_t seed = 1337,
                         TensorOptions options = {});

  // idx int32 (B, T), T <= block_size -> logits (B, T, vocab_size).
  Tensor forward(const Tensor& idx) const;
  // Mean cross-entropy of forward(idx) against int32 targets (B, T).
  Tensor loss(const Tensor& idx, const Tensor& targets) const;

  // Incremental decoding: idx int32 (B, T) holds the ids at positions
  // cache.length .. cache.length + T - 1 of sequences whose earlier ids went
  // through forward(., cache) (cache empty at first); returns their logits
  // (B, T, vocab_size), equal to forward() of the whole sequences at those
  // positions, and appends them to the cache. cache.length + T <= block_size.
  // Inference only: records no autograd, and refuses training mode with
  // dropout (call eval()). The first call (the prompt) runs the fused
  // attention op; each later call attends over the cached keys and values:
  // one token costs O(context) with vanilla attention, O(longest segment)
  // with dilated attention, instead of a forward over the whole context.
  Tensor forward(const Tensor& idx, KVCache& cache) const;

  // Appends max_new_tokens ids to `prompt`, each picked by `sample` from the
  // float32 logits of the last position (vocab_size values on the host),
  // with a KVCache. The model sees a window of the latest ids, at positions
  // from 0 as in training: the last block_size ids of the prompt, growing by
  // one per new id; when the window is full (block_size ids), it restarts
  // from its last block_size / 2 ids (at least one), which are fed again
  // from an empty cache. So each id is drawn from exactly the logits
  // forward() gives for a window of the latest ids: all of them while they
  // fit in block_size, then between block_size / 2 and block_size of them.
  // (Re-feeding half a window every block_size / 2 ids keeps the cost per id
  // bounded; sliding by one id would re-feed the whole window every time.)
  // Runs without recording autograd; throws in training mode when dropout > 0
  // (call eval() first).
  std::vector<int32_t> generate(std::vector<int32_t> prompt, int64_t max_new_tokens,
                                const std::function<int32_t(const std::vector<float>&)>& sample) const;

  // Sequence parallelism (nn/attention.h, SequenceParallel): from now on
  // forward() and loss() take this rank's chunk of each sequence, at global
  // positions sp.offset() .. (learned position rows and rotary angles of the
  // chunk), and every attention layer attends across the ranks of sp.comm()
  // (every block's layer must be a MultiHeadSelfAttention). A default
  // SequenceParallel{} turns it off. Cached decoding refuses it.
  void set_sequence_parallel(const SequenceParallel& sp);

  const TransformerLMConfig& config() const { return config_; }
  // The dropout mask stream; save/restore its state for exact resume.
  Generator& dropout_generator() { return dropout_gen_; }

  std::shared_ptr<Embedding> wte, wpe;  // wpe null unless position_embedding == "learned"
  std::shared_ptr<Dropout> drop;
  std::vector<std::shared_ptr<TransformerBlock>> h;
  std::shared_ptr<LayerNorm> ln_f;
  std::shared_ptr<Linear> lm_head;  // null when tie_weights (wte->weight is used)

 private:
  // Token (+ learned position, from `position`) embeddings of idx, then dropout.
  Tensor embed(const Tensor& idx, int64_t position) const;
  // The LM head, over the final LayerNorm's output.
  Tensor head(const Tensor& x_ln) const;

  TransformerLMConfig config_;
  Generator dropout_gen_;
  SequenceParallel sequence_parallel_;
};

// Checks a TransformerLM state dict (e.g. a checkpoint's "model." tensors)
// against `config` before a model is built from it, so that metadata read
// from a file cannot make the constructor allocate far beyond what the file
// holds: wte.weight is (vocab_size, n_embd); wpe.weight is
// (block_size, n_embd) exactly when position_embedding is "learned";
// lm_head.weight is (vocab_size, n_embd) exactly when !tie_weights; the
// blocks are h.0 .. h.<n_layer - 1>, each with its MLP weights
// (4 n_embd, n_embd) and (n_embd, 4 n_embd). Throws naming the field and the
// tensor. (load_state_dict then checks every name and shape.)
void check_state_dict(const TransformerLMConfig& config, const StateDict& weights);

}  // namespace minidl::nn
