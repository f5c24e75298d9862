#include "cpu/random_windows.h"

#include <algorithm>

#include "core/philox.h"

namespace minidl::cpu {

void random_windows(const Tensor& tokens, uint64_t seed, uint64_t offset, const Tensor& x, const Tensor& y) {
  const int64_t batch = x.size(0), length = x.size(1);
  const auto range = static_cast<uint64_t>(tokens.numel() - length);
  const auto* src = static_cast<const int32_t*>(tokens.raw_data());
  auto* xp = static_cast<int32_t*>(x.raw_data());
  auto* yp = static_cast<int32_t*>(y.raw_data());
  for (int64_t b = 0; b < batch; ++b) {
    const auto start = static_cast<int64_t>(philox::uniform_below(seed, offset, static_cast<uint64_t>(b), range));
    std::copy_n(src + start, length, xp + b * length);
    std::copy_n(src + start + 1, length, yp + b * length);
  }
}

}  // namespace minidl::cpu
