#pragma once
// The few tensor operations the autograd engine itself needs (seeding,
// accumulating and zero-filling gradients). Declared here, defined by the ops
// layer (ops/autograd_support.cpp), so autograd does not include ops.
#include "core/tensor.h"

namespace minidl::autograd::detail {
Tensor add(const Tensor& a, const Tensor& b);
Tensor zeros(const Shape& shape, TensorOptions options);
Tensor ones(const Shape& shape, TensorOptions options);
Tensor cast(const Tensor& t, DType dtype);
Tensor clone(const Tensor& t);  // a contiguous copy
}  // namespace minidl::autograd::detail
