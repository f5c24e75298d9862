#include "core/allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace minidl {
namespace {

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes) override {
    size_t rounded = (std::max<size_t>(nbytes, 1) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    MINIDL_CHECK(p != nullptr, "cpu allocator: out of memory allocating ", nbytes, " bytes");
    size_t now = allocated_.fetch_add(nbytes) + nbytes;
    size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return p;
  }
  void deallocate(void* ptr, size_t nbytes) override {
    std::free(ptr);
    allocated_.fetch_sub(nbytes);
  }
  MemoryStats stats() const { return {allocated_.load(), peak_.load(), allocated_.load()}; }
  void reset_peak() { peak_.store(allocated_.load()); }

 private:
  std::atomic<size_t> allocated_{0}, peak_{0};
};

CpuAllocator& cpu_allocator() {
  static CpuAllocator* a = new CpuAllocator();  // never destroyed: tensors may outlive statics
  return *a;
}

}  // namespace

Allocator& allocator_for(Device device) {
  if (device.is_cpu()) return cpu_allocator();
  return backend::cuda_allocator(device.index);
}

MemoryStats memory_stats(Device device) {
  return device.is_cpu() ? cpu_allocator().stats() : backend::cuda_memory_stats(device.index);
}

void reset_peak_memory_stats(Device device) {
  if (device.is_cpu()) cpu_allocator().reset_peak();
  else backend::cuda_reset_peak_memory_stats(device.index);
}

void empty_cache(Device device) {
  if (device.is_cuda()) backend::cuda_empty_cache(device.index);
}

bool cuda_is_available() { return backend::cuda_device_count() > 0; }
int cuda_device_count() { return backend::cuda_device_count(); }
void synchronize(Device device) {
  if (device.is_cuda()) backend::synchronize(device.index);
}

}  // namespace minidl
