#pragma once
// CPU gather and scatter-add along one dim: the kernels of index_select and
// embedding (and of their backward passes).
//
// The tensor indexed (`x`, or `grad_x`) is contiguous and read as
// (outer, size, inner) around `dim`; the other operand (`out`, or
// `grad_out`) is contiguous and read as (outer, n, inner) with
// n = indices.numel(). Indices are contiguous int32 already checked to lie in
// [0, size) by the op.
#include "core/tensor.h"

namespace minidl::cpu {

// out[o, k, i] = x[o, indices[k], i]; any dtype.
void index_select(const Tensor& x, int64_t dim, const Tensor& indices, const Tensor& out);

// grad_x[o, indices[k], i] += grad_out[o, k, i]. grad_x is float32 when
// grad_out is bfloat16 (the sum is kept in fp32), else grad_out's dtype.
// Deterministic: each (o, i) lane is summed in index order by one thread.
void index_add(const Tensor& grad_out, int64_t dim, const Tensor& indices, const Tensor& grad_x);

}  // namespace minidl::cpu
