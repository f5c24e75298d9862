#pragma once
// CUDA runtime glue: checked calls, the per-device stream every kernel and
// cuBLAS call runs on, and the cuBLAS handles.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace minidl::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line);

// The stream minidl uses on the current device (non-blocking, created lazily).
cudaStream_t stream();
cublasHandle_t cublas_handle();
cublasLtHandle_t cublaslt_handle();
// cuBLASLt workspace on the current device (sized once).
void* cublaslt_workspace(size_t* nbytes);
int current_device();
int multiprocessor_count();
// major * 10 + minor of the current device, e.g. 90 for an H100.
int compute_capability();
void synchronize();

// ---- host synchronisation counter (debug) ----
// Every host wait on the stream goes through synchronize() — explicit waits
// and the blocking copies of the allocator backend (item(), to_vector(),
// uploads) — which counts it, so a test can assert that a training step adds
// none.
uint64_t host_sync_count();

// Launch configuration for a grid-stride loop over n elements.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535LL * 32 ? (blocks > 0 ? blocks : 1) : 65535LL * 32);
}

}  // namespace minidl::cuda

#define MINIDL_CUDA_CHECK(expr)                                                    \
  do {                                                                             \
    cudaError_t minidl_err_ = (expr);                                              \
    if (minidl_err_ != cudaSuccess)                                                \
      ::minidl::cuda::throw_cuda_error(minidl_err_, #expr, __FILE__, __LINE__);    \
  } while (0)

#define MINIDL_CUBLAS_CHECK(expr)                                                  \
  do {                                                                             \
    cublasStatus_t minidl_st_ = (expr);                                            \
    if (minidl_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      ::minidl::cuda::throw_cublas_error(minidl_st_, #expr, __FILE__, __LINE__);   \
  } while (0)

// After every kernel launch: surfaces launch-configuration errors at once.
#define MINIDL_CUDA_LAUNCH_CHECK() MINIDL_CUDA_CHECK(cudaGetLastError())
