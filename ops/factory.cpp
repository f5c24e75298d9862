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
}  // namespace

Tensor empty(const Shape& shape, TensorOptions options) { return Tensor::empty(shape, options); }

Tensor zeros(const Shape& shape, TensorOptions options) {
  Tensor t = Tensor::empty(shape, plain(options));
  backend::zero_bytes(t.raw_data(), t.device(), t.nbytes());
  return finish(t, options);
}

Tensor full(const Shape& shape, double value, TensorOptions options) {
  Tensor t = Tensor::empty(shape, plain(options));
  MINIDL_DISPATCH(t.device(), unary, UnaryOp::Fill, t, value, t);
  return finish(t, options);
}

Tensor ones(const Shape& shape, TensorOptions options) { return full(shape, 1.0, options); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), t.options()); }
Tensor ones_like(const Tensor& t) { return ones(t.shape(), t.options()); }

Tensor arange(int64_t end, TensorOptions options) { return arange(0, double(end), 1, options); }

Tensor arange(double start, double end, double step, TensorOptions options) {
  MINIDL_CHECK(step != 0 && std::isfinite(start) && std::isfinite(end), "arange: invalid range (",
               start, ", ", end, ", step ", step, ")");
  int64_t n = std::max<int64_t>(0, static_cast<int64_t>(std::ceil((end - start) / step)));
  std::vector<double> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[static_cast<size_t>(i)] = start + static_cast<double>(i) * step;
  return from_vector(values, {n}, options);
}

Tensor rand(const Shape& shape, TensorOptions options, Generator* gen) {
  Generator& g = gen ? *gen : default_generator();
  Tensor t = Tensor::empty(shape, plain(options));
  detail::check_floating("rand", t);
  MINIDL_DISPATCH(t.device(), fill_uniform, t, g.seed(), g.next_offset());
  return finish(t, options);
}

Tensor randn(const Shape& shape, TensorOptions options, Generator* gen) {
  Generator& g = gen ? *gen : default_generator();
  Tensor t = Tensor::empty(shape, plain(options));
  detail::check_floating("randn", t);
  MINIDL_DISPATCH(t.device(), fill_normal, t, g.seed(), g.next_offset());
  return finish(t, options);
}

}  // namespace minidl::ops
