#include "core/generator.h"

#include "core/error.h"

namespace minidl {

uint64_t Generator::next_offset() {
  MINIDL_CHECK(device_offset_ == nullptr,
               "Generator: a random op that takes a host offset ran while the generator is bound to a "
               "device offset (CUDA graph capture); each replay would draw the same numbers. Draw it "
               "outside the captured work, or use an op whose kernel reads a PhiloxOffset");
  return offset_++;
}

PhiloxOffset Generator::next_philox_offset() {
  if (device_offset_) return {device_offset_, offset_++ - bound_at_};
  return {nullptr, offset_++};
}

void Generator::bind_device_offset(const uint64_t* device_offset) {
  MINIDL_CHECK(device_offset != nullptr, "Generator::bind_device_offset: null device offset");
  MINIDL_CHECK(device_offset_ == nullptr, "Generator::bind_device_offset: already bound (one capture at a time)");
  device_offset_ = device_offset;
  bound_at_ = offset_;
}

uint64_t Generator::unbind_device_offset() {
  MINIDL_CHECK(device_offset_ != nullptr, "Generator::unbind_device_offset: not bound");
  device_offset_ = nullptr;
  return offset_ - bound_at_;
}

Generator& default_generator() {
  static Generator g;
  return g;
}

void manual_seed(uint64_t seed) { default_generator().manual_seed(seed); }

}  // namespace minidl
