#pragma once
// Device memory. The CPU allocator hands out 64-byte aligned blocks; the CUDA
// allocator caches freed blocks by size so a training step reuses memory
// instead of calling cudaMalloc/cudaFree.
#include <cstddef>

#include "core/device.h"

namespace minidl {

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes) = 0;
  virtual void deallocate(void* ptr, size_t nbytes) = 0;
};

Allocator& allocator_for(Device device);

struct MemoryStats {
  size_t allocated = 0;       // bytes held by live tensors
  size_t peak_allocated = 0;  // high-water mark of `allocated` since the last reset
  size_t reserved = 0;        // bytes obtained from the driver (live + cached)
};

MemoryStats memory_stats(Device device);
void reset_peak_memory_stats(Device device);
// Returns cached, unused CUDA blocks to the driver.
void empty_cache(Device device);

namespace backend {
// Implemented by the CUDA layer (cuda/allocator.cpp) or, when minidl is
// built without CUDA, by stubs (cuda/no_cuda/) that throw for a CUDA device:
// there the device count is 0, empty_cache does nothing and CPU-to-CPU
// copies work. Core calls them, never the reverse.
Allocator& cuda_allocator(int device);
MemoryStats cuda_memory_stats(int device);
void cuda_reset_peak_memory_stats(int device);
void cuda_empty_cache(int device);
int cuda_device_count();
// Copies between any two devices (synchronous when the host is involved).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes);
void zero_bytes(void* dst, Device device, size_t nbytes);
void synchronize(int device);

// Makes `device` the calling thread's current CUDA device until the scope
// ends (nothing for the CPU, or when it already is): CUDA work runs on the
// current device's stream with its handles, so every CUDA op runs under the
// device of its tensors (MINIDL_DISPATCH), whatever device the thread chose.
class DeviceScope {
 public:
  explicit DeviceScope(Device device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;  // the device to restore; -1: nothing changed
};
}  // namespace backend

}  // namespace minidl
