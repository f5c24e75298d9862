#pragma once
// CUDA reductions; same contract as cpu/reduce.h.
#include "core/tensor.h"

namespace minidl::cuda {
void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out);
void sum_first(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out);
void max_last(const Tensor& in, int64_t rows, int64_t cols, const Tensor& values,
              const Tensor& indices);
void max_last_backward(const Tensor& grad, const Tensor& indices, int64_t rows, int64_t cols,
                       const Tensor& grad_in);
}  // namespace minidl::cuda
