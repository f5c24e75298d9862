#pragma once
// CUDA kernel of ops::random_windows; the same contract as cpu/random_windows.h.
#include "core/tensor.h"

namespace minidl::cuda {

void random_windows(const Tensor& tokens, uint64_t seed, uint64_t offset, const Tensor& x, const Tensor& y);

}  // namespace minidl::cuda
