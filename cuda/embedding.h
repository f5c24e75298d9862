#pragma once
// CUDA kernel of ops::embedding_dropout's forward: out = dropout(weight[indices]
// + positions) in one pass, with the rounding and the mask of the embedding,
// add and dropout kernels it replaces (the same bits). Out-of-range indices
// read as zeros, as in cuda::index_select.
#include "core/generator.h"
#include "core/tensor.h"

namespace minidl::cuda {

// weight (V, C) and positions (T, C) contiguous (positions may be undefined:
// none), indices contiguous int32 whose last dim is T, out contiguous
// (*indices.shape, C). keep_threshold <= 0: no dropout.
void embedding_dropout_forward(const Tensor& weight, const Tensor& indices, const Tensor& positions,
                               uint64_t seed, PhiloxOffset offset, float keep_threshold, double scale,
                               const Tensor& out);

}  // namespace minidl::cuda
