// Tensor factories. Random ones draw from the Philox stream of a Generator,
// so CPU and CUDA tensors made from the same generator state match.
#include <cmath>

#include "core/allocator.h"
#include "cpu/elementwise.h"
#include "cpu/random.h"
#include "cuda/elementwise.h"
#include "cuda/random.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {
Tensor finish(Tensor t, const TensorOptions& options) {
  if (options.requires_grad) t.requires_grad_(true);
  return t;
}
TensorOptions plain(TensorOptions o) {
  o.requires_grad = false;
  return o;
}
// Tensor::empty, with shape errors (negative or overflowing sizes) naming the factory.
Tensor make(const char* op, const Shape& shape, const TensorOptions& options) {
  checked_nbytes(shape, element_size(options.dtype), op);
  return Tensor::empty(shape, plain(options));
}
}  // namespace

Tensor empty(const Shape& shape, TensorOptions options) { return Tensor::empty(shape, options); }

Tensor zeros(const Shape& shape, TensorOptions options) {
  Tensor t = make("zeros", shape, options);
  backend::zero_bytes(t.raw_data(), t.device(), t.nbytes());
  return finish(t, options);
}

namespace {
Tensor filled(const char* op, const Shape& shape, double value, const TensorOptions& options) {
  Tensor t = make(op, shape, options);
  MINIDL_DISPATCH(t.device(), unary, UnaryOp::Fill, t, value, t);
  return finish(t, options);
}
}  // namespace

Tensor full(const Shape& shape, double value, TensorOptions options) {
  return filled("full", shape, value, options);
}
Tensor ones(const Shape& shape, TensorOptions options) { return filled("ones", shape, 1.0, options); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), t.options()); }
Tensor ones_like(const Tensor& t) { return ones(t.shape(), t.options()); }

Tensor arange(int64_t end, TensorOptions options) { return arange(0, double(end), 1, options); }

Tensor arange(double start, double end, double step, TensorOptions options) {
  MINIDL_CHECK(step != 0 && std::isfinite(start) && std::isfinite(end) && std::isfinite(step),
               "arange: invalid range (", start, ", ", end, ", step ", step, ")");
  double count = std::ceil((end - start) / step);  // +-inf when end - start overflows
  MINIDL_CHECK(count < 0x1p63, "arange: range (", start, ", ", end, ", step ", step, ") has ",
               count, " elements, more than int64 can count");
  int64_t n = count > 0 ? static_cast<int64_t>(count) : 0;
  checked_nbytes({n}, sizeof(double), "arange");  // the host values below
  std::vector<double> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[static_cast<size_t>(i)] = start + static_cast<double>(i) * step;
  return from_vector(values, {n}, options);
}

Tensor rand(const Shape& shape, TensorOptions options, Generator* gen) {
  Generator& g = gen ? *gen : default_generator();
  Tensor t = make("rand", shape, options);
  detail::check_floating("rand", t);
  MINIDL_DISPATCH(t.device(), fill_uniform, t, g.seed(), g.next_offset());
  return finish(t, options);
}

Tensor randn(const Shape& shape, TensorOptions options, Generator* gen) {
  Generator& g = gen ? *gen : default_generator();
  Tensor t = make("randn", shape, options);
  detail::check_floating("randn", t);
  MINIDL_DISPATCH(t.device(), fill_normal, t, g.seed(), g.next_offset());
  return finish(t, options);
}

}  // namespace minidl::ops
