// The op (checks, dispatch, autograd) and its CPU kernels.
#include "softplus.h"

#include <algorithm>
#include <cmath>

namespace myops {
using namespace minidl;

namespace {
// Stable in both tails: log1p(e^-|x|) + max(x, 0).
template <typename T> T softplus_value(T x) { return std::log1p(std::exp(-std::abs(x))) + std::max(x, T(0)); }
template <typename T> T sigmoid_value(T x) { return T(1) / (T(1) + std::exp(-x)); }

// Calls f with a typed pointer view of contiguous float32/float64 tensors.
template <typename F> void with_floats(const Tensor& t, F&& f) {
  if (t.dtype() == DType::Float64) f(double{});
  else if (t.dtype() == DType::Float32) f(float{});
  else MINIDL_FAIL("softplus (cpu): expected float32 or float64, got ", t.dtype());
}
}  // namespace

void softplus_cpu(const Tensor& x, Tensor& y) {
  with_floats(x, [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data_ptr<T>();
    T* out = y.data_ptr<T>();
    for (int64_t i = 0; i < x.numel(); ++i) out[i] = softplus_value(in[i]);
  });
}

void softplus_grad_cpu(const Tensor& x, const Tensor& g, Tensor& dx) {
  with_floats(x, [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data_ptr<T>();
    const T* up = g.data_ptr<T>();
    T* out = dx.data_ptr<T>();
    for (int64_t i = 0; i < x.numel(); ++i) out[i] = up[i] * sigmoid_value(in[i]);
  });
}

Tensor softplus(const Tensor& x_in) {
  MINIDL_CHECK(x_in.defined() && is_floating(x_in.dtype()), "softplus: expected a floating-point tensor");
  MINIDL_CHECK(!x_in.is_cuda() || x_in.dtype() != DType::Float64,
               "softplus: float64 is CPU-only; the CUDA kernels take float32 and bfloat16");
  Tensor x = x_in.contiguous();  // the kernels read flat memory
  Tensor y = Tensor::empty(x.shape(), x.options());
  if (x.is_cuda()) {
#if defined(MINIDL_WITH_CUDA)
    softplus_cuda(x, y);
#endif
  } else {
    softplus_cpu(x, y);
  }
  // Record the backward only when some input needs a gradient; save only
  // what it reads (x), as a SavedTensor so in-place changes are detected.
  if (autograd::needs_grad({x})) {
    autograd::record("softplus", {x}, {y},
                     [saved = autograd::SavedTensor(x, "softplus")](const std::vector<Tensor>& grads) {
                       Tensor x = saved.get();
                       Tensor g = grads[0].contiguous();
                       Tensor dx = Tensor::empty(x.shape(), x.options());
                       if (x.is_cuda()) {
#if defined(MINIDL_WITH_CUDA)
                         softplus_grad_cuda(x, g, dx);
#endif
                       } else {
                         softplus_grad_cpu(x, g, dx);
                       }
                       return std::vector<Tensor>{dx};
                     });
  }
  return y;
}

}  // namespace myops
