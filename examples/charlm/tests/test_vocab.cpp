// charlm's character vocabulary: ids, round trips, and its errors.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "core/error.h"
#include "vocab.h"

using charlm::CharVocab;
using minidl::Error;

TEST_CASE("CharVocab: sorted distinct bytes, encode/decode round trip") {
  CharVocab vocab = CharVocab::from_text("hello, world\n");
  CHECK(vocab.to_string() == "\n ,dehlorw");
  CHECK(vocab.size() == 10);
  CHECK(vocab.encode("hello") == std::vector<int32_t>{5, 4, 6, 6, 7});
  CHECK(vocab.decode({5, 4, 6, 6, 7}) == "hello");
  CHECK(vocab.decode(vocab.encode("world, hello\n")) == "world, hello\n");
  CHECK(vocab.contains('w'));
  CHECK(!vocab.contains('z'));
  CHECK(vocab.encode("").empty());

  // Stored as a string (checkpoint metadata) and rebuilt identically.
  CharVocab back = CharVocab::from_string(vocab.to_string());
  CHECK(back.encode("hello, world\n") == vocab.encode("hello, world\n"));

  // Bytes above 127 sort as unsigned.
  CharVocab bytes = CharVocab::from_text(std::string("a\xff\x01", 3));
  CHECK(bytes.to_string() == std::string("\x01" "a\xff", 3));
}

TEST_CASE("CharVocab errors") {
  CHECK_THROWS_WITH_AS(CharVocab::from_text(""), doctest::Contains("CharVocab: the text is empty"), Error);
  CharVocab vocab = CharVocab::from_text("abc");
  CHECK_THROWS_WITH_AS(vocab.encode("abz"),
                       doctest::Contains("character 'z' at position 2 is not in the vocabulary of 3 characters"),
                       Error);
  CHECK_THROWS_WITH_AS(vocab.encode(std::string("a\tb")),
                       doctest::Contains("character byte 0x09 at position 1"), Error);
  CHECK_THROWS_WITH_AS(vocab.decode({0, 3}),
                       doctest::Contains("id 3 at position 1 is outside the vocabulary [0, 3)"), Error);
  CHECK_THROWS_WITH_AS(vocab.decode({-1}), doctest::Contains("id -1 at position 0"), Error);
  CHECK_THROWS_WITH_AS(CharVocab::from_string("ba"),
                       doctest::Contains("must be sorted and distinct; 'b' is followed by 'a' at position 1"),
                       Error);
  CHECK_THROWS_WITH_AS(CharVocab::from_string(""), doctest::Contains("string is empty"), Error);
}
