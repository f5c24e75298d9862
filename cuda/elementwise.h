#pragma once
// CUDA elementwise launchers; same contract as cpu/elementwise.h.
#include "core/scalar_math.h"
#include "core/tensor.h"

namespace minidl::cuda {

void unary(UnaryOp op, const Tensor& x, double p, const Tensor& out);
void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out);
void where(const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out);
void copy(const Tensor& src, const Tensor& out);

}  // namespace minidl::cuda
