#pragma once
// CPU reductions over the last dim of a contiguous (M, R) view.
#include "core/tensor.h"

namespace minidl::cpu {
// out[m] = scale * sum_r in[m, r]; in is contiguous, out has M elements.
void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out);
}  // namespace minidl::cpu
