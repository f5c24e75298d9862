// Dropout with a mask that is never stored: element i is kept when
// philox::uniform(seed, offset, i) >= p for the generator offset reserved at
// forward time, so backward regenerates it, and CPU and CUDA agree.
#include <cmath>

#include "autograd/tape.h"
#include "cpu/random.h"
#include "cuda/random.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
using detail::DropoutMask;

namespace detail {
// y = x * mask / (1 - p), with y contiguous.
Tensor apply_dropout_mask(const Tensor& x, const DropoutMask& m) {
  Tensor y = Tensor::empty(x.shape(), x.options());
  if (m.offset.base) {  // CUDA only (checked by dropout())
#if defined(MINIDL_WITH_CUDA)
    backend::DeviceScope scope(x.device());
    cuda::dropout(x, m.seed, m.offset, m.keep_threshold, m.scale, y);
#endif
  } else {
    MINIDL_DISPATCH(x.device(), dropout, x, m.seed, m.offset.delta, m.keep_threshold, m.scale, y);
  }
  return y;
}

DropoutMask reserve_dropout_mask(double p, Generator* gen, const Tensor& x, const char* name) {
  Generator& g = gen ? *gen : default_generator();
  MINIDL_CHECK(!g.device_offset() || x.is_cuda(), name, ": the generator is bound to a device offset (CUDA "
               "graph capture) but x is ", describe(x), "; device offsets are for CUDA only");
  // Uniforms are multiples of 2^-24, so the smallest one that is >= p is
  // ceil(p 2^24) / 2^24: comparing against it in float is exactly u >= p.
  return {g.seed(), g.next_philox_offset(), static_cast<float>(std::ceil(p * 16777216.0) / 16777216.0),
          1.0 / (1.0 - p)};
}
}  // namespace detail

Tensor dropout(const Tensor& x, double p, bool training, Generator* gen) {
  const char* name = "dropout";
  detail::check_defined(name, x, "input");
  detail::check_floating(name, x);
  MINIDL_CHECK(p >= 0.0 && p < 1.0, name, ": p must be in [0, 1), got ", p);
  if (!training || p == 0.0) return x;
  DropoutMask mask = detail::reserve_dropout_mask(p, gen, x, name);
  Tensor y = detail::apply_dropout_mask(x, mask);
  if (autograd::needs_grad({x})) {
    autograd::record(name, {x}, {y}, [mask](const std::vector<Tensor>& grads) {
      return std::vector<Tensor>{detail::apply_dropout_mask(grads[0], mask)};
    });
  }
  return y;
}

}  // namespace minidl::ops
