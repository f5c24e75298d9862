#pragma once
// CUDA gather and scatter-add along one dim; same contract as cpu/indexing.h,
// except that indices are not range-checked (that needs the indices on the
// host): out-of-range entries read as zeros forward and are skipped backward,
// so a bad index gives wrong numbers but never touches memory out of bounds.
#include <vector>

#include "core/tensor.h"

namespace minidl::cuda {

void index_select(const Tensor& x, int64_t dim, const Tensor& indices, const Tensor& out);
// Scatter-add with atomics into grad_x (float32 for bfloat16 gradients, so the
// sum is kept in fp32); the summation order, hence the last bits, may vary
// from run to run.
void index_add(const Tensor& grad_out, int64_t dim, const Tensor& indices, const Tensor& grad_x);

// out = the concatenation of `inputs` along `dim`, in one launch per
// kMaxCatInputs inputs (instead of a copy per input). The inputs are
// contiguous, of out's dtype and device, and match out except in `dim`; out
// is contiguous.
constexpr int kMaxCatInputs = 8;
void cat(const std::vector<Tensor>& inputs, int64_t dim, const Tensor& out);

}  // namespace minidl::cuda
