#include "nn/data.h"

#include <cmath>

#include "ops/ops.h"

namespace minidl::nn {

TrainValSplit split_train_val(const std::vector<int32_t>& tokens, double train_fraction) {
  MINIDL_CHECK(train_fraction > 0 && train_fraction < 1,
               "split_train_val: train_fraction must be in (0, 1), got ", train_fraction);
  const auto n_train = static_cast<size_t>(std::floor(train_fraction * static_cast<double>(tokens.size())));
  return {std::vector<int32_t>(tokens.begin(), tokens.begin() + n_train),
          std::vector<int32_t>(tokens.begin() + n_train, tokens.end())};
}

BatchSampler::BatchSampler(const std::vector<int32_t>& tokens, int64_t batch_size, int64_t block_size,
                           uint64_t seed, Device device, std::string name)
    : batch_size_(batch_size), block_size_(block_size), gen_(seed), device_(device), name_(std::move(name)) {
  MINIDL_CHECK(batch_size > 0 && block_size > 0, "BatchSampler(", name_,
               "): batch_size and block_size must be positive, got ", batch_size, " and ", block_size);
  MINIDL_CHECK(static_cast<int64_t>(tokens.size()) >= block_size + 1, "BatchSampler(", name_,
               "): the split has ", tokens.size(), " tokens, fewer than one context + 1 = ",
               block_size + 1, " (block_size ", block_size, ")");
  tokens_ = from_vector(tokens, {static_cast<int64_t>(tokens.size())}, {DType::Int32, device_, false});
}

std::pair<Tensor, Tensor> BatchSampler::next() {
  return ops::random_windows(tokens_, batch_size_, block_size_, &gen_);
}

}  // namespace minidl::nn
