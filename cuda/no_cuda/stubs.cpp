// Built instead of cuda/ when minidl is configured without CUDA: every entry
// point the upper layers call exists and throws a clear error.
#include <cstring>

#include "core/allocator.h"
#include "core/error.h"

namespace minidl::backend {

[[noreturn]] static void no_cuda(const char* what) {
  MINIDL_FAIL(what, ": minidl was built without CUDA (nvcc not found or -DMINIDL_CUDA=OFF)");
}

Allocator& cuda_allocator(int) { no_cuda("cuda allocator"); }
MemoryStats cuda_memory_stats(int) { no_cuda("memory_stats"); }
void cuda_reset_peak_memory_stats(int) { no_cuda("reset_peak_memory_stats"); }
void cuda_empty_cache(int) {}
int cuda_device_count() { return 0; }

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes) {
  if (dst_device.is_cuda() || src_device.is_cuda()) no_cuda("copy");
  if (nbytes) std::memcpy(dst, src, nbytes);
}

void zero_bytes(void* dst, Device device, size_t nbytes) {
  if (device.is_cuda()) no_cuda("zero");
  if (nbytes) std::memset(dst, 0, nbytes);
}

void synchronize(int) { no_cuda("synchronize"); }

DeviceScope::DeviceScope(Device) {}  // a CUDA op throws next
DeviceScope::~DeviceScope() = default;

}  // namespace minidl::backend
