// CUDA kernels of the user op: float32 and bfloat16, fp32 math.
#include <cuda_runtime.h>

#include <algorithm>

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

// Launches on the default stream after synchronising minidl's, so a user op
// needs nothing from minidl's internal CUDA headers. (Ops inside the library
// launch on cuda::stream() instead; see cuda/runtime.h.)
template <typename Launch>
void launch(const Tensor& x, Launch&& body) {
  synchronize(x.device());
  int64_t n = x.numel();
  unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  if (n > 0) body(blocks);
  cudaError_t err = cudaDeviceSynchronize();
  MINIDL_CHECK(err == cudaSuccess, "softplus (cuda): ", cudaGetErrorString(err));
}
}  // namespace

void softplus_cuda(const Tensor& x, Tensor& y) {
  launch(x, [&](unsigned blocks) {
    if (x.dtype() == DType::Float32)
      softplus_kernel<<<blocks, 256>>>(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
    else
      softplus_kernel<<<blocks, 256>>>(x.data_ptr<BFloat16>(), y.data_ptr<BFloat16>(), x.numel());
  });
}

void softplus_grad_cuda(const Tensor& x, const Tensor& g, Tensor& dx) {
  launch(x, [&](unsigned blocks) {
    if (x.dtype() == DType::Float32)
      softplus_grad_kernel<<<blocks, 256>>>(x.data_ptr<float>(), g.data_ptr<float>(), dx.data_ptr<float>(), x.numel());
    else
      softplus_grad_kernel<<<blocks, 256>>>(x.data_ptr<BFloat16>(), g.data_ptr<BFloat16>(),
                                            dx.data_ptr<BFloat16>(), x.numel());
  });
}

}  // namespace myops
