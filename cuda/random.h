#pragma once
// CUDA random fills; the same streams as cpu/random.h.
#include "core/tensor.h"

namespace minidl::cuda {
void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset);
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset);
}  // namespace minidl::cuda
