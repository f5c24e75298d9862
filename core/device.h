#pragma once
// Where a tensor lives: the CPU or one CUDA device.
#include <cstdint>
#include <ostream>
#include <string>

namespace minidl {

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::CUDA, index}; }
  // "cpu", "cuda", "cuda:N" (N in decimal, as str() writes it: no sign, blanks
  // or leading zeros); throws minidl::Error otherwise.
  static Device parse(const std::string& text);

  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  std::string str() const;
  friend bool operator==(const Device&, const Device&) = default;
};

std::ostream& operator<<(std::ostream& os, const Device& device);

// True when minidl was built with CUDA and at least one GPU is usable.
bool cuda_is_available();
int cuda_device_count();
// Waits until all queued work on `device` has finished (no-op on the CPU).
// Training code needs it only where a value is read on the host anyway.
void synchronize(Device device);

}  // namespace minidl
