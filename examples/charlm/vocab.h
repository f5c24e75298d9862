#pragma once
// charlm's character vocabulary: the text's distinct bytes, each byte one
// token. The library's data code (nn/data.h) works on token ids of any
// tokenizer; this is the tokenizer of the character-level model.
#include <cstdint>
#include <string>
#include <vector>

namespace charlm {

// Ids are the ranks of the text's distinct bytes in sorted order.
class CharVocab {
 public:
  CharVocab() = default;
  // Throws on empty text.
  static CharVocab from_text(const std::string& text);
  // Rebuilds from to_string() (e.g. checkpoint metadata); the characters
  // must be sorted and distinct.
  static CharVocab from_string(const std::string& chars);
  // The characters in id order.
  const std::string& to_string() const { return chars_; }

  int64_t size() const { return static_cast<int64_t>(chars_.size()); }
  bool contains(char c) const { return id_[static_cast<unsigned char>(c)] >= 0; }
  // Throws naming the character and its position when it is not in the vocabulary.
  std::vector<int32_t> encode(const std::string& text) const;
  // Throws naming an id outside [0, size()).
  std::string decode(const std::vector<int32_t>& ids) const;

 private:
  void build_index();
  std::string chars_;
  int32_t id_[256];
};

}  // namespace charlm
