#pragma once
// CPU random kernels on the Philox stream (core/philox.h).
#include "core/tensor.h"

namespace minidl::cpu {

// out (contiguous, floating) = element i of the uniform [0,1) or normal stream.
void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset);
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset);

// out[i] = philox::uniform(seed, offset, i) >= keep_threshold ? x[i] * scale : 0,
// i the row-major index; x may be strided, out is contiguous. The op passes
// keep_threshold as a multiple of 2^-24 (uniform's grid), so the float
// comparison is exact and matches the CUDA kernel bit for bit.
void dropout(const Tensor& x, uint64_t seed, uint64_t offset, float keep_threshold, double scale,
             const Tensor& out);

}  // namespace minidl::cpu
