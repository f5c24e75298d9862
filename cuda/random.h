#pragma once
// CUDA random kernels; the same streams and contracts as cpu/random.h.
#include "core/tensor.h"

namespace minidl::cuda {
void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset);
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset);
void dropout(const Tensor& x, uint64_t seed, uint64_t offset, float keep_threshold, double scale,
             const Tensor& out);
}  // namespace minidl::cuda
