#pragma once
// CUDA reductions over the last dim of a contiguous (M, R) view.
#include "core/tensor.h"

namespace minidl::cuda {
void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out);
}  // namespace minidl::cuda
