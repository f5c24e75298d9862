#pragma once
// A refcounted block of device memory shared by a tensor and its views. The
// version counter is bumped by in-place writes so autograd can detect a
// tensor changed after it was saved for backward.
#include <cstddef>
#include <cstdint>

#include "core/device.h"

namespace minidl {

class Storage {
 public:
  Storage(size_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }
  uint64_t version() const { return version_; }
  void bump_version() { ++version_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  uint64_t version_ = 0;
};

}  // namespace minidl
