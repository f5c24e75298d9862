#pragma once
// CPU kernel of ops::random_windows.
#include "core/tensor.h"

namespace minidl::cpu {

// x, y int32 (batch, length), contiguous: row b is the window of tokens
// (1-D int32, contiguous, n elements) at philox::uniform_below(seed, offset,
// b, n - length), and the same shifted by one.
void random_windows(const Tensor& tokens, uint64_t seed, uint64_t offset, const Tensor& x, const Tensor& y);

}  // namespace minidl::cpu
