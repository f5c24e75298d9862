// The tensor math the autograd engine needs (autograd/tensor_math.h).
#include "autograd/tensor_math.h"
#include "ops/ops.h"

namespace minidl::autograd::detail {
Tensor add(const Tensor& a, const Tensor& b) { return ops::add(a, b); }
Tensor zeros(const Shape& shape, TensorOptions options) { return ops::zeros(shape, options); }
Tensor ones(const Shape& shape, TensorOptions options) { return ops::ones(shape, options); }
Tensor cast(const Tensor& t, DType dtype) { return ops::to(t, dtype); }
Tensor clone(const Tensor& t) { return ops::clone(t); }
}  // namespace minidl::autograd::detail
