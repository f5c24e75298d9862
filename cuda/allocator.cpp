// The CUDA caching allocator and the core backend hooks (core/allocator.h).
// Freed blocks go to a per-size free list and are handed out again; sizes
// are rounded (512 B below 1 MiB, 1 MiB above) so a training loop's repeated
// shapes hit the cache. All work runs on one stream per device, so a block
// freed by the host can be reused by the next kernel without an event.
//
// Graph-private pools (cuda/runtime.h): while a CUDA graph is captured, the
// device's allocations come from the graph's pool and every block freed
// joins it, whoever allocated it (the graph may still touch it), except a
// block of another graph's pool, which stays that graph's (its replays
// write it). A pool's blocks are never handed to other work, so the
// addresses baked into the graph stay its own between replays; releasing
// the pool returns them.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/allocator.h"
#include "cuda/runtime.h"

namespace minidl {
namespace {

size_t round_size(size_t n) {
  constexpr size_t kSmall = 512, kLarge = 1u << 20;
  if (n < kLarge) return std::max<size_t>((n + kSmall - 1) / kSmall * kSmall, kSmall);
  return (n + kLarge - 1) / kLarge * kLarge;
}

using FreeLists = std::unordered_map<size_t, std::vector<void*>>;  // by rounded size

// cudaMalloc on the current device; out of memory, when `may_release`, it
// calls `release` (which frees cached blocks) and tries once more. The
// error, if any, is returned and cleared from the runtime's last error.
template <class Release>
cudaError_t malloc_retrying(void** p, size_t size, bool may_release, Release release) {
  cudaError_t err = cudaMalloc(p, size);
  if (err == cudaErrorMemoryAllocation && may_release) {
    (void)cudaGetLastError();
    release();
    err = cudaMalloc(p, size);
  }
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

class CudaCachingAllocator final : public Allocator {
 public:
  explicit CudaCachingAllocator(int device) : device_(device) {}

  void* allocate(size_t nbytes) override {
    size_t size = round_size(nbytes);
    std::lock_guard<std::mutex> lock(mutex_);
    FreeLists& lists = capturing_ ? pools_[capturing_] : free_;
    void* p = nullptr;
    auto it = lists.find(size);
    if (it != lists.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
    } else {
      backend::DeviceScope scope(Device::cuda(device_));
      // Not released while capturing: that waits for the stream.
      const cudaError_t err = malloc_retrying(&p, size, !capturing_, [this] { release_cached_locked(); });
      if (err != cudaSuccess) {
        MINIDL_FAIL("cuda allocator: out of memory allocating ", nbytes, " bytes on cuda:", device_,
                    " (", stats_.allocated, " bytes in use, ", stats_.reserved, " reserved",
                    capturing_ ? ", during a CUDA graph capture" : "", "): ", cudaGetErrorString(err));
      }
      stats_.reserved += size;
      if (capturing_) pool_of_[p] = capturing_;
    }
    stats_.allocated += size;
    stats_.peak_allocated = std::max(stats_.peak_allocated, stats_.allocated);
    return p;
  }

  void deallocate(void* ptr, size_t nbytes) override {
    size_t size = round_size(nbytes);
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.allocated -= size;
    // A block of a pool goes back to it (its graph writes it at every
    // replay, even when another graph's capture frees it); any other block
    // freed during a capture joins the capture's pool.
    if (auto owner = pool_of_.find(ptr); owner != pool_of_.end()) {
      pools_[owner->second][size].push_back(ptr);
    } else if (capturing_) {
      pool_of_[ptr] = capturing_;
      pools_[capturing_][size].push_back(ptr);
    } else {
      free_[size].push_back(ptr);
    }
  }

  // ---- graph-private pools ----
  void begin_pool(uint64_t pool) {
    std::lock_guard<std::mutex> lock(mutex_);
    MINIDL_CHECK(capturing_ == 0, "cuda allocator: a graph pool is already active on cuda:", device_,
                 " (one capture at a time)");
    capturing_ = pool;
    pools_[pool];
  }
  void end_pool() {
    std::lock_guard<std::mutex> lock(mutex_);
    capturing_ = 0;
  }
  // The pool's free blocks return to the cache; its live ones do when freed.
  void release_pool(uint64_t pool) {
    std::lock_guard<std::mutex> lock(mutex_);
    MINIDL_CHECK(capturing_ != pool, "cuda allocator: releasing the graph pool of a capture under way");
    auto it = pools_.find(pool);
    if (it == pools_.end()) return;
    for (auto& [size, blocks] : it->second) free_[size].insert(free_[size].end(), blocks.begin(), blocks.end());
    pools_.erase(it);
    std::erase_if(pool_of_, [pool](const auto& entry) { return entry.second == pool; });
  }

  MemoryStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_allocated = stats_.allocated;
  }
  void empty_cache() {
    backend::DeviceScope scope(Device::cuda(device_));  // release_cached_locked waits for this device's stream
    std::lock_guard<std::mutex> lock(mutex_);
    release_cached_locked();
  }

 private:
  void release_cached_locked() {
    cuda::synchronize();  // counted: an out-of-memory retry inside a step is a host sync
    for (auto& [size, blocks] : free_) {
      for (void* p : blocks) {
        cudaFree(p);
        stats_.reserved -= size;
      }
      blocks.clear();
    }
  }

  int device_;
  std::mutex mutex_;
  FreeLists free_;
  std::unordered_map<uint64_t, FreeLists> pools_;  // graph-private pools by id
  std::unordered_map<void*, uint64_t> pool_of_;    // blocks that belong to a pool
  uint64_t capturing_ = 0;                          // the pool of the capture under way, 0: none
  MemoryStats stats_;
};

CudaCachingAllocator& caching_allocator(int device) {
  MINIDL_CHECK(device >= 0 && device < backend::cuda_device_count(), "cuda allocator: device cuda:",
               device, " does not exist (", backend::cuda_device_count(), " CUDA devices)");
  static auto* allocators = new std::vector<CudaCachingAllocator*>(16, nullptr);
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  auto& a = allocators->at(static_cast<size_t>(device));
  if (!a) a = new CudaCachingAllocator(device);  // leaked: outlives static tensors
  return *a;
}

}  // namespace

namespace cuda {

uint64_t create_graph_pool() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}
void begin_graph_pool(uint64_t pool) { caching_allocator(current_device()).begin_pool(pool); }
void end_graph_pool() { caching_allocator(current_device()).end_pool(); }
void release_graph_pool(int device, uint64_t pool) { caching_allocator(device).release_pool(pool); }

void* malloc_persistent(size_t nbytes, const char* what) {
  void* p = nullptr;
  const cudaError_t err = malloc_retrying(&p, nbytes, !stream_capturing(),
                                          [] { caching_allocator(current_device()).empty_cache(); });
  if (err != cudaSuccess) {
    MINIDL_FAIL(what, ": out of memory allocating ", nbytes, " bytes on cuda:", current_device(), ": ",
                cudaGetErrorString(err));
  }
  return p;
}

}  // namespace cuda

namespace backend {

Allocator& cuda_allocator(int device) { return caching_allocator(device); }
MemoryStats cuda_memory_stats(int device) { return caching_allocator(device).stats(); }
void cuda_reset_peak_memory_stats(int device) { caching_allocator(device).reset_peak(); }
void cuda_empty_cache(int device) { caching_allocator(device).empty_cache(); }

int cuda_device_count() {
  static int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

DeviceScope::DeviceScope(Device device) {
  if (!device.is_cuda()) return;
  const int current = cuda::current_device();
  if (current == device.index) return;
  MINIDL_CUDA_CHECK(cudaSetDevice(device.index));
  previous_ = current;
}
DeviceScope::~DeviceScope() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);  // a destructor must not throw
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes) {
  if (nbytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, nbytes);
    return;
  }
  if (dst_device.is_cuda() && src_device.is_cuda() && dst_device != src_device) {
    // Between two GPUs: after the source device's queued work (which may
    // still be writing src), on the destination's stream (ordered with its
    // next kernels), and finished before returning (src's allocator may hand
    // its block to other work once the caller lets go of it).
    synchronize(src_device.index);
    DeviceScope scope(dst_device);
    MINIDL_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDefault, cuda::stream()));
    cuda::synchronize();
    return;
  }
  // On the stream of the GPU involved, not the thread's current device's.
  DeviceScope scope(dst_device.is_cuda() ? dst_device : src_device);
  cudaMemcpyKind kind = dst_device.is_cpu()   ? cudaMemcpyDeviceToHost
                        : src_device.is_cpu() ? cudaMemcpyHostToDevice
                                              : cudaMemcpyDeviceToDevice;
  MINIDL_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, kind, cuda::stream()));
  if (kind != cudaMemcpyDeviceToDevice) cuda::synchronize();  // counted (cuda::host_sync_count)
}

void zero_bytes(void* dst, Device device, size_t nbytes) {
  if (nbytes == 0) return;
  if (device.is_cpu()) return (void)std::memset(dst, 0, nbytes);
  DeviceScope scope(device);
  MINIDL_CUDA_CHECK(cudaMemsetAsync(dst, 0, nbytes, cuda::stream()));
}

void synchronize(int device) {
  DeviceScope scope(Device::cuda(device));
  cuda::synchronize();
}

}  // namespace backend
}  // namespace minidl
