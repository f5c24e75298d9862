#pragma once
// CPU reductions over a contiguous (M, R) matrix: along its rows (the last
// dim) or down its columns (the leading dim).
#include "core/tensor.h"

namespace minidl::cpu {

// out[m] = scale * sum_r in[m, r]; in is contiguous, out has M elements.
void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out);
// out[c] = scale * sum_r in[r, c]; in is a contiguous (rows, cols) matrix.
void sum_first(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out);
// values[m] = max_r in[m, r], indices[m] = the first r attaining it (NaN
// counts as the largest value, as in NumPy). `values` may be undefined
// (argmax); indices is int32 with M elements.
void max_last(const Tensor& in, int64_t rows, int64_t cols, const Tensor& values,
              const Tensor& indices);
// grad_in (rows, cols) = grad[m] at column indices[m] of row m, 0 elsewhere.
void max_last_backward(const Tensor& grad, const Tensor& indices, int64_t rows, int64_t cols,
                       const Tensor& grad_in);

}  // namespace minidl::cpu
