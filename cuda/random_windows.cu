#include <algorithm>

#include "core/philox.h"
#include "cuda/random_windows.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row (grid-stride over rows); every thread of a row derives
// the row's start itself, which is cheaper than sharing it through a barrier.
__global__ void random_windows_kernel(const int32_t* __restrict__ tokens, int32_t* __restrict__ x,
                                      int32_t* __restrict__ y, int64_t batch, int64_t length, uint64_t range,
                                      uint64_t seed, uint64_t offset) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const int32_t* src = tokens + philox::uniform_below(seed, offset, static_cast<uint64_t>(b), range);
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
      x[b * length + t] = src[t];
      y[b * length + t] = src[t + 1];
    }
  }
}

}  // namespace

void random_windows(const Tensor& tokens, uint64_t seed, uint64_t offset, const Tensor& x, const Tensor& y) {
  const int64_t batch = x.size(0), length = x.size(1);
  if (batch == 0 || length == 0) return;
  const auto range = static_cast<uint64_t>(tokens.numel() - length);
  const auto grid = static_cast<unsigned>(std::min<int64_t>(batch, 65535));
  random_windows_kernel<<<grid, kThreads, 0, stream()>>>(
      static_cast<const int32_t*>(tokens.raw_data()), static_cast<int32_t*>(x.raw_data()),
      static_cast<int32_t*>(y.raw_data()), batch, length, range, seed, offset);
  MINIDL_CUDA_LAUNCH_CHECK();
}

}  // namespace minidl::cuda
