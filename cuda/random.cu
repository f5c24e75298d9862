#include "core/philox.h"
#include "cuda/random.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

template <typename S, bool kNormal>
__global__ void fill_kernel(S* out, int64_t n, uint64_t seed, uint64_t offset) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = kNormal ? philox::normal(seed, offset, i) : philox::uniform(seed, offset, i);
    out[i] = static_cast<S>(v);
  }
}

template <bool kNormal>
void fill(const Tensor& out, uint64_t seed, uint64_t offset) {
  int64_t n = out.numel();
  if (n == 0) return;
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    fill_kernel<S, kNormal><<<grid_for(n, 256), 256, 0, stream()>>>(
        static_cast<S*>(out.raw_data()), n, seed, offset);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace

void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset) { fill<false>(out, seed, offset); }
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset) { fill<true>(out, seed, offset); }

}  // namespace minidl::cuda
