#pragma once
// CUDA runtime glue inside the library: the cuBLAS handles and device
// queries. The stream, the checked-call macros and grid_for are public, in
// cuda/launch.h.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <mutex>

#include "cuda/launch.h"

namespace minidl::cuda {

[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line);

// Both libraries run in workspaces minidl allocates once per device, so that
// a call captured in a CUDA graph allocates nothing: cublas_handle() is given
// its own with cublasSetWorkspace; cuBLASLt calls pass cublaslt_workspace().
cublasHandle_t cublas_handle();
cublasLtHandle_t cublaslt_handle();
void* cublaslt_workspace(size_t* nbytes);

// Host threads that share a device (virtual ranks of the in-process backend)
// share its stream, handles and workspaces. Stream order keeps one kernel's
// buffers safe, not a sequence of kernels that hands state from one to the
// next: a split-K GEMM and its reduction through the workspace, or launches
// that count blocks in one device word. Whoever enqueues such a sequence
// holds this lock (per device) while enqueueing it.
std::unique_lock<std::mutex> lock_device_queue();

// Raises the dynamic shared-memory limit of each kernel to `bytes` on the
// current device: the attribute is per device, so once per (device, kernel),
// from any thread.
void allow_dynamic_smem(const void* kernel, int bytes);
template <typename... Kernels>
void allow_dynamic_smem(int bytes, Kernels... kernels) {
  (allow_dynamic_smem(reinterpret_cast<const void*>(kernels), bytes), ...);
}
// Fails with a clear error, once per kernel, unless ptxas gave `kernel` at
// least `regs` registers a thread: a warp-specialised kernel's setmaxnreg
// split can only hand out what the block was launched with, and asking for
// more hangs (cuda/hopper.cuh).
void require_launch_registers(const void* kernel, int regs, const char* what);
template <typename... Kernels>
void require_launch_registers(int regs, const char* what, Kernels... kernels) {
  (require_launch_registers(reinterpret_cast<const void*>(kernels), regs, what), ...);
}
// Two ints of device memory per device, zero between launches, for the
// work counters of persistent kernels: a launch hands out work items from
// [0] and counts finished blocks in [1]; its last block zeroes both again.
// One stream per device orders the launches that use them.
int* scheduler_counters();
int current_device();
// Whether minidl's stream of the current device is being captured into a
// CUDA graph.
bool stream_capturing();
int multiprocessor_count();
// The current device's memory in bytes (all of it, not what is free).
size_t device_memory_bytes();
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
// cudaMalloc on the current device for memory kept until exit (the cuBLAS
// workspaces): on out-of-memory the device's cached blocks go back to the
// driver and it tries once more, as the caching allocator does; then it
// throws, naming `what`.
void* malloc_persistent(size_t nbytes, const char* what);

}  // namespace minidl::cuda

#define MINIDL_CUBLAS_CHECK(expr)                                                  \
  do {                                                                             \
    cublasStatus_t minidl_st_ = (expr);                                            \
    if (minidl_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      ::minidl::cuda::throw_cublas_error(minidl_st_, #expr, __FILE__, __LINE__);   \
  } while (0)
