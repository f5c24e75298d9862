#pragma once
// The public part of minidl's CUDA layer, for kernels written outside the
// library (docs/extending.md, examples/custom_op) as well as inside it:
// minidl's stream, checked CUDA calls and a launch helper. For .cu files and
// CUDA builds only (it needs cuda_runtime.h). Pick the kernel for a tensor's
// dtype with visit_dtype (core/dtype.h) or a plain if.
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "core/error.h"

namespace minidl::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);

// The stream minidl runs every kernel, copy and cuBLAS call on, for the
// current device (non-blocking, created on first use). Work launched on it is
// ordered after the kernels that wrote a tensor and before the ones that
// read the result, so a custom op needs no synchronisation, and a training
// step stays free of host syncs. The legacy default stream (<<<grid, block>>>
// with no stream) is not ordered with it.
cudaStream_t stream();

// Blocks for a grid-stride loop over n elements, `threads` per block: at
// least one, at most 65535 * 32.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535LL * 32 ? (blocks > 0 ? blocks : 1) : 65535LL * 32);
}

}  // namespace minidl::cuda

// Throws minidl::Error naming the call, file and line when a CUDA call fails.
#define MINIDL_CUDA_CHECK(expr)                                                    \
  do {                                                                             \
    cudaError_t minidl_err_ = (expr);                                              \
    if (minidl_err_ != cudaSuccess)                                                \
      ::minidl::cuda::throw_cuda_error(minidl_err_, #expr, __FILE__, __LINE__);    \
  } while (0)

// After every kernel launch: surfaces launch-configuration errors at once.
#define MINIDL_CUDA_LAUNCH_CHECK() MINIDL_CUDA_CHECK(cudaGetLastError())

#if defined(__CUDACC__)
namespace minidl::cuda {

// kernel<<<grid_for(n, 256), 256, 0, stream()>>>(args...) followed by the
// launch check: the launch of a grid-stride kernel over n elements. Launches
// nothing when n is 0.
//   cuda::launch_grid_stride(n, my_kernel<float>, x.data_ptr<float>(), n);
template <typename... Params, typename... Args>
void launch_grid_stride(int64_t n, void (*kernel)(Params...), Args&&... args) {
  constexpr int kThreads = 256;
  if (n <= 0) return;
  kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(std::forward<Args>(args)...);
  MINIDL_CUDA_LAUNCH_CHECK();
}

}  // namespace minidl::cuda
#endif
