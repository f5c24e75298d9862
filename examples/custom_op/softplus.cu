// CUDA kernels of the user op: float32 and bfloat16, fp32 math. They launch
// on minidl's stream (cuda/launch.h), so they run in order with minidl's own
// kernels: no device synchronisation before or after.
#include "core/allocator.h"
#include "cuda/launch.h"
#include "softplus.h"

namespace myops {
using namespace minidl;

namespace {
template <typename T>
__global__ void softplus_kernel(const T* x, T* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = static_cast<float>(x[i]);
    y[i] = static_cast<T>(log1pf(expf(-fabsf(v))) + fmaxf(v, 0.f));
  }
}

template <typename T>
__global__ void softplus_grad_kernel(const T* x, const T* g, T* dx, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = static_cast<float>(x[i]);
    dx[i] = static_cast<T>(static_cast<float>(g[i]) / (1.f + expf(-v)));
  }
}

// Calls f with a float or BFloat16 tag: the dtypes these kernels take
// (softplus() refuses the others on the GPU).
template <typename F> void with_cuda_floats(const Tensor& t, F&& f) {
  if (t.dtype() == DType::BFloat16) f(BFloat16{});
  else f(float{});
}
}  // namespace

// Each launch runs under x's device: cuda::stream() is the current device's,
// and minidl's own ops make their tensors' device current the same way.
void softplus_cuda(const Tensor& x, Tensor& y) {
  backend::DeviceScope scope(x.device());
  with_cuda_floats(x, [&](auto tag) {
    using T = decltype(tag);
    cuda::launch_grid_stride(x.numel(), softplus_kernel<T>, x.data_ptr<T>(), y.data_ptr<T>(), x.numel());
  });
}

void softplus_grad_cuda(const Tensor& x, const Tensor& g, Tensor& dx) {
  backend::DeviceScope scope(x.device());
  with_cuda_floats(x, [&](auto tag) {
    using T = decltype(tag);
    cuda::launch_grid_stride(x.numel(), softplus_grad_kernel<T>, x.data_ptr<T>(), g.data_ptr<T>(),
                             dx.data_ptr<T>(), x.numel());
  });
}

}  // namespace myops
