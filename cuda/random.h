#pragma once
// CUDA random kernels; the same streams and contracts as cpu/random.h.
#include "core/generator.h"
#include "core/tensor.h"

namespace minidl::cuda {
void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset);
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset);
// `offset` may live on the device (a captured CUDA graph: PhiloxOffset).
void dropout(const Tensor& x, uint64_t seed, PhiloxOffset offset, float keep_threshold, double scale,
             const Tensor& out);
inline void dropout(const Tensor& x, uint64_t seed, uint64_t offset, float keep_threshold, double scale,
                    const Tensor& out) {
  dropout(x, seed, PhiloxOffset{nullptr, offset}, keep_threshold, scale, out);
}

// Device offset words of generators in CUDA graphs (core/generator.h), one
// tiny kernel each on minidl's stream: *word = value, and *word += n.
void set_offset_word(uint64_t* word, uint64_t value);
void advance_offset_word(uint64_t* word, uint64_t n);
}  // namespace minidl::cuda
