#pragma once
// Token data for language models, whatever the tokenizer: the 90/10
// train/validation split of a token sequence, and a seeded sampler of (x, y)
// batches of random windows (nanoGPT's get_batch). Tokenizers belong to the
// programs (charlm's character vocabulary: examples/charlm/vocab.h).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"
#include "core/generator.h"
#include "core/tensor.h"

namespace minidl::nn {

struct TrainValSplit {
  std::vector<int32_t> train, val;
};

// The first floor(train_fraction * n) tokens train, the rest validate.
TrainValSplit split_train_val(const std::vector<int32_t>& tokens, double train_fraction = 0.9);

// Random windows of block_size + 1 consecutive tokens: x is the first
// block_size, y the same shifted by one (ops::random_windows). Start
// positions come from the Philox stream of the sampler's own Generator, so a
// seed fixes the batches on every device. The tokens are copied to the
// sampler's device once, when it is made; on CUDA next() is one kernel that
// gathers the windows there, so sampling never waits for the device.
class BatchSampler {
 public:
  // Throws when tokens.size() < block_size + 1, naming both sizes.
  BatchSampler(const std::vector<int32_t>& tokens, int64_t batch_size, int64_t block_size, uint64_t seed,
               Device device = Device::cpu(), std::string name = "data");
  // x, y: int32 (batch_size, block_size) on the sampler's device.
  std::pair<Tensor, Tensor> next();

  int64_t batch_size() const { return batch_size_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_tokens() const { return tokens_.numel(); }
  // Save/restore for exact resume.
  Generator& generator() { return gen_; }

 private:
  Tensor tokens_;  // 1-D int32 on the sampler's device
  int64_t batch_size_, block_size_;
  Generator gen_;
  Device device_;
  std::string name_;
};

}  // namespace minidl::nn
