#pragma once
// CPU elementwise kernels. Inputs are already broadcast (expanded) to the
// output's shape and may have any strides, stride 0 included; `out` may be a
// strided view too (in-place ops write through it).
#include "core/scalar_math.h"
#include "core/tensor.h"

namespace minidl::cpu {

void unary(UnaryOp op, const Tensor& x, double p, const Tensor& out);
void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out);
void where(const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out);
// out = src element by element, converting dtype.
void copy(const Tensor& src, const Tensor& out);

}  // namespace minidl::cpu
