#pragma once
// A tiny built-in bitmap font (5x7 pixels, printable ASCII), so the plots
// need no font files or libraries.
#include <cstdint>

namespace minidl::plot {

constexpr int kGlyphColumns = 5;
constexpr int kGlyphRows = 7;

// The seven row masks of `c` (bit 4 = leftmost column); '?' for characters
// outside printable ASCII.
const uint8_t* glyph(char c);

}  // namespace minidl::plot
