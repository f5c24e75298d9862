#pragma once
// Internal helpers of the ops over the last dim (ops/nn_functional.cpp,
// ops/dropout_add_layer_norm.cpp): a tensor seen as a (rows, cols) matrix.
#include "autograd/grad_mode.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops::detail {

// float32 statistics for float32/bfloat16 inputs, float64 for float64.
inline DType stats_dtype(DType dtype) { return dtype == DType::Float64 ? DType::Float64 : DType::Float32; }

struct Rows {
  int64_t rows = 0, cols = 0;
};

// Checks an input of an op over the last dim; returns it as (rows, cols).
inline Rows last_dim_rows(const char* op, const Tensor& x) {
  check_defined(op, x, "input");
  check_floating(op, x);
  MINIDL_CHECK(x.dim() >= 1, op, ": expected a tensor with at least 1 dim, got ", describe(x));
  Rows r;
  r.cols = x.size(-1);
  r.rows = r.cols == 0 ? 0 : x.numel() / r.cols;
  return r;
}

// Contiguous input for a kernel; the copy is internal (the op records the
// original tensor as its input).
inline Tensor contiguous_input(const Tensor& x) {
  NoGradGuard no_grad;
  return contiguous(x);
}

// An optional per-column parameter (weight or bias): undefined, or (cols)
// of x's dtype and device.
inline void check_param(const char* op, const Tensor& p, const char* name, const Tensor& x, int64_t cols) {
  if (!p.defined()) return;
  check_same_device(op, x, p);
  check_same_dtype(op, x, p);
  MINIDL_CHECK(p.dim() == 1 && p.size(0) == cols, op, ": ", name, " must have shape [", cols,
               "] (the last dim of the input ", describe(x), "), got ", describe(p));
}

}  // namespace minidl::ops::detail
