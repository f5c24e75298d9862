#pragma once
// CUDA runtime glue inside the library: the cuBLAS handles and device
// queries. The stream, the checked-call macros and grid_for are public, in
// cuda/launch.h.
#include <cublasLt.h>
#include <cublas_v2.h>

#include "cuda/launch.h"

namespace minidl::cuda {

[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line);

// Both libraries run in workspaces minidl allocates once per device, so that
// a call captured in a CUDA graph allocates nothing: cublas_handle() is given
// its own with cublasSetWorkspace; cuBLASLt calls pass cublaslt_workspace().
cublasHandle_t cublas_handle();
cublasLtHandle_t cublaslt_handle();
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

// ---- graph-private memory pools (cuda/allocator.cpp) ----
// Between begin_graph_pool(pool) and end_graph_pool() (a CUDA graph capture on
// the current device), the device's allocations come from `pool` and every
// block freed joins it; its blocks are never handed to other work until
// release_graph_pool, so a replayed graph's memory stays its own.
uint64_t create_graph_pool();
void begin_graph_pool(uint64_t pool);
void end_graph_pool();
void release_graph_pool(int device, uint64_t pool);

}  // namespace minidl::cuda

#define MINIDL_CUBLAS_CHECK(expr)                                                  \
  do {                                                                             \
    cublasStatus_t minidl_st_ = (expr);                                            \
    if (minidl_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      ::minidl::cuda::throw_cublas_error(minidl_st_, #expr, __FILE__, __LINE__);   \
  } while (0)
