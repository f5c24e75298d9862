#include "vocab.h"

#include <algorithm>
#include <sstream>

#include "core/error.h"

namespace charlm {
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

}  // namespace charlm
