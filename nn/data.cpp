#include "nn/data.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "ops/ops.h"

namespace minidl::nn {
namespace {

// 'a', or "\x0a" for bytes that do not print.
std::string show_char(char c) {
  auto u = static_cast<unsigned char>(c);
  std::ostringstream os;
  if (u >= 32 && u < 127) os << '\'' << c << '\'';
  else os << "byte 0x" << std::hex << (u >> 4) << (u & 15);
  return os.str();
}

}  // namespace

void CharVocab::build_index() {
  std::fill(std::begin(id_), std::end(id_), -1);
  for (size_t i = 0; i < chars_.size(); ++i) id_[static_cast<unsigned char>(chars_[i])] = static_cast<int32_t>(i);
}

CharVocab CharVocab::from_text(const std::string& text) {
  MINIDL_CHECK(!text.empty(), "CharVocab: the text is empty; a vocabulary needs at least one character");
  bool present[256] = {};
  for (char c : text) present[static_cast<unsigned char>(c)] = true;
  CharVocab v;
  for (int b = 0; b < 256; ++b)
    if (present[b]) v.chars_.push_back(static_cast<char>(b));
  v.build_index();
  return v;
}

CharVocab CharVocab::from_string(const std::string& chars) {
  MINIDL_CHECK(!chars.empty(), "CharVocab::from_string: the vocabulary string is empty");
  for (size_t i = 1; i < chars.size(); ++i)
    MINIDL_CHECK(static_cast<unsigned char>(chars[i - 1]) < static_cast<unsigned char>(chars[i]),
                 "CharVocab::from_string: characters must be sorted and distinct; ",
                 show_char(chars[i - 1]), " is followed by ", show_char(chars[i]), " at position ", i);
  CharVocab v;
  v.chars_ = chars;
  v.build_index();
  return v;
}

std::vector<int32_t> CharVocab::encode(const std::string& text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    int32_t id = id_[static_cast<unsigned char>(text[i])];
    MINIDL_CHECK(id >= 0, "CharVocab::encode: character ", show_char(text[i]), " at position ", i,
                 " is not in the vocabulary of ", chars_.size(), " characters");
    ids[i] = id;
  }
  return ids;
}

std::string CharVocab::decode(const std::vector<int32_t>& ids) const {
  std::string text(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    MINIDL_CHECK(ids[i] >= 0 && ids[i] < size(), "CharVocab::decode: id ", ids[i], " at position ", i,
                 " is outside the vocabulary [0, ", size(), ")");
    text[i] = chars_[static_cast<size_t>(ids[i])];
  }
  return text;
}

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
