#pragma once
// CPU random fills from the Philox stream (core/philox.h).
#include "core/tensor.h"

namespace minidl::cpu {
// out (contiguous, floating) = element i of the uniform [0,1) or normal stream.
void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset);
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset);
}  // namespace minidl::cpu
